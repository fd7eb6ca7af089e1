"""Which models a client of ``orion serve`` may name: the server's policy, not the core's.

By default a client's model name is resolved only against what this ORION_HOME has: a name in the
registry (``orion import``, ``orion fetch``, an encoder converted here), a Hub repo or catalog name
that a registered model came from, and the built-in encoder (``minilm``: fetched once if it is not
here, then converted on first use, as ``orion embed`` does). Anything else (a path, a relative name,
a Hub repo or catalog name not here) gets one answer, the same whether or not a file of that name
exists, decided from the name and the registry alone: a client learns nothing of the server's disk
and starts no download. :func:`refusal` is that answer (404 ``model_not_found``).

- ``allow_paths`` (``orion serve --allow-paths``): a client may also name a GGUF file (or an encoder
  folder) by absolute path; a relative one is refused all the same (it would resolve from the
  server's working directory, not the client's), and so is ``~``.
- ``allow_fetch`` (``--allow-fetch``): a Hub repo or catalog name that is not here is fetched (the
  best quantization that fits, as ``orion fetch`` picks it) and registered.

A Hub name is fetched here, by its reference, and only then given to the core by the name it was
registered under: the core's own resolution would take a name like ``org/repo`` for a path when
the server's working directory holds one. A client's fetch never replaces a registration: where the
name it would be registered under is another model's here, it is refused before anything is
downloaded (:func:`name_taken`), and the registry is written with ``replace=False`` (a concurrent
``orion fetch`` or ``import`` of that name meanwhile is kept, the client refused). The CLI's
in-process commands (``orion run FILE.gguf``, ``orion embed --model PATH``) do not come here:
:mod:`orion_cli.loading` resolves anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import InvalidValue, NotFound, OrionError, WrongModelKind
from ..models import LocalModel, ModelRef, Registry, catalog, default_name_for

BUILTIN_ENCODER = "minilm"  # the default encoder: served by default, fetched once when it is not here
REFUSAL_HINT = ("orion fetch or import it first, pass --local to work in this process, "
                "or start the server with --allow-paths / --allow-fetch")


def refusal(name: str) -> NotFound:
    """The one answer to a model this server does not serve: it depends on the name alone."""
    return NotFound(f"{name!r} is not a model this server has (orion list lists them)", hint=REFUSAL_HINT)


class _NoReplace(Registry):
    """The registry as a server-side fetch writes it: a name that already stands for another model
    is refused (:meth:`Registry.add` with ``replace=False``), never taken over."""

    def add(self, model: LocalModel, *, replace: bool = False) -> None:
        try:
            super().add(model, replace=False)
        except InvalidValue:
            raise name_taken(model.name) from None


def name_taken(name: str) -> InvalidValue:
    """The answer to a fetch whose model would be registered under ``name``, another model's here."""
    return InvalidValue(f"this server has another model named {name!r}, the name this model would be "
                        "registered under", hint="on the server's machine: orion fetch MODEL --name OTHER_NAME, "
                                                 "then name it here by its repo or that name")


def _unclaimed(ref: ModelRef) -> ModelRef:
    """``ref``, once the name it would be registered under is not another model's here."""
    if Registry().get(ref.name) is not None:  # check() found no model of this repo (and file) here
        raise name_taken(ref.name)
    return ref


@dataclass(frozen=True)
class Allowed:
    """What the core is given for a name the policy lets through."""

    how: str  # "registered", "path" (an absolute path, --allow-paths) or "fetch" (a Hub name not here)
    name: str  # registered/path: the name the core resolves (``@TYPE`` kept); fetch: the client's
    ref: ModelRef | None = None  # fetch: what to fetch
    suffix: str = ""  # encoders: the ``@TYPE`` asked for


def _hub_ref(text: str) -> ModelRef | None:
    """The catalog entry or Hub repo (``org/repo``, ``org/repo/file.gguf``) a name stands for, from
    its text alone (no file is looked at); None for anything else."""
    cat = catalog()
    if text in cat:
        e = cat[text]
        return ModelRef(e.name, e.kind, "catalog", repo=e.repo, pattern=e.pattern, projector=e.projector,
                        format=e.format, files=e.files)
    from ..models import _REPO_RE  # the repo shape models.resolve() accepts

    parts = text.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or text.startswith(("~", ".")):
        return None
    repo = "/".join(parts[:2])
    if not _REPO_RE.match(repo):
        return None
    if len(parts) == 2:
        return ModelRef(default_name_for(repo), "llm", "repo", repo=repo)
    filename = "/".join(parts[2:])
    if not filename.endswith(".gguf"):
        return None
    return ModelRef(default_name_for(repo, filename), "llm", "repo", repo=repo, filename=filename)


def _split_type(name: str) -> tuple[str, str]:
    """``minilm@q8_0`` -> (``minilm``, ``@q8_0``): the type an encoder is converted to."""
    from ..convert import TARGETS

    base, at, suffix = name.rpartition("@")
    if at and base and suffix.lower() in TARGETS:
        return base, "@" + suffix
    return name, ""


@dataclass(frozen=True)
class ModelAccess:
    """The models a server's clients may name (see the module's docstring); the default is the
    strict one. :meth:`check` decides from the name and the registry; :meth:`local_model` and
    :meth:`encoder_model` are the core's functions of the same names behind that check."""

    allow_paths: bool = False
    allow_fetch: bool = False

    def describe(self) -> str:
        """What clients may name beyond the registered models, for the server's console."""
        allowed = []
        if self.allow_paths:
            allowed.append("any GGUF file this user can read, by absolute path (--allow-paths)")
        if self.allow_fetch:
            allowed.append("Hub models that are not here, downloaded (--allow-fetch)")
        return " and ".join(allowed)

    def check(self, name: str, *, encoder: bool = False) -> Allowed:
        """What the core may be given for ``name``, or :func:`refusal` (raised)."""
        local = Registry().all()
        if name in local:
            return Allowed("registered", name)
        text, suffix = _split_type(name) if encoder else (name, "")
        if "\x00" in text or not text.strip():
            raise refusal(name)
        if text in local:  # an encoder with a type: minilm@q8_0
            return Allowed("registered", name, suffix=suffix)
        ref = _hub_ref(text)
        if ref is not None:
            here = sorted(m.name for m in local.values()
                          if m.repo == ref.repo and (ref.filename is None or m.filename == ref.filename))
            if len(here) == 1:
                return Allowed("registered", here[0] + suffix, suffix=suffix)
            if here:
                raise NotFound(f"{text!r} is {len(here)} models here ({', '.join(here)})", hint="name one of them")
            if not encoder and ref.format != "gguf":  # as the core says it, before any download
                raise WrongModelKind(f"{text} is an encoder published as safetensors",
                                     hint="use it with /v1/embeddings")
            if self.allow_fetch or (encoder and text == BUILTIN_ENCODER):
                return Allowed("fetch", name, ref, suffix)
            raise refusal(name)
        if self.allow_paths and PurePosixPath(text).is_absolute():
            return Allowed("path", name, suffix=suffix)
        raise refusal(name)

    def local_model(self, name: str, strategy) -> LocalModel:
        """The LLM (or encoder GGUF) ``name`` stands for, as :func:`orion_cli.loading.local_model`
        finds it, if this policy lets it through (a Hub name not here fetched first, when allowed)."""
        from ..loading import local_model

        allowed = self.check(name)
        if allowed.how == "fetch":
            from ..fetch import fetch, plan_fetch

            return fetch(plan_fetch(_unclaimed(allowed.ref), strategy), registry=_NoReplace())
        return local_model(allowed.name, strategy)

    def encoder_model(self, name: str | None, strategy, *, prefer_id: str | None = None):
        """:func:`orion_cli.loading.encoder_model` (default ``minilm``) behind this policy."""
        from ..loading import encoder_model

        allowed = self.check(name or BUILTIN_ENCODER, encoder=True)
        target = allowed.name
        if allowed.how == "fetch":
            ref = allowed.ref
            if ref.format != "safetensors":
                raise WrongModelKind(f"{name} is not an encoder", hint="use minilm, a BERT repo, folder or GGUF")
            from ..snapshots import fetch_snapshot

            target = fetch_snapshot(_unclaimed(ref), registry=_NoReplace()).name + allowed.suffix
        return encoder_model(target, strategy, prefer_id=prefer_id)

    def pull(self, text: str, strategy, *, quant: str | None = None, on_file=None, on_bytes=None) -> LocalModel:
        """What a client's pull (Ollama's ``/api/pull``) asks: the catalog name or Hub repo ``text``
        fetched as ``orion fetch`` picks (``quant``: a level or an exact type) and registered, never
        replacing a registration; one already here is answered as it is. Only with ``allow_fetch``:
        a strict server starts no download for a client (:class:`PullRefused`)."""
        if not self.allow_fetch:
            raise PullRefused(f"this server does not fetch models for clients ({text!r} was asked)",
                              hint="on the server's machine: orion fetch MODEL; or start it with --allow-fetch")
        registered = Registry().get(text)
        if registered is not None and quant is None:  # a name of this server's: nothing to pull
            return registered
        ref = _hub_ref(text)
        if ref is None:
            raise NotFound(f"{text!r} is not a catalog name or a Hub repo (org/repo)",
                           hint="give hf.co/OWNER/REPO[:QUANT], org/repo or a catalog name")
        here = [m for m in Registry().all().values() if m.repo == ref.repo
                and (quant is None or (m.file_type or "").upper() == quant.upper())
                and (ref.filename is None or m.filename == ref.filename)]
        if here:
            return here[0]
        if ref.format == "safetensors":
            from ..snapshots import fetch_snapshot

            return fetch_snapshot(_unclaimed(ref), registry=_NoReplace())
        from dataclasses import replace

        from ..fetch import fetch, plan_fetch

        if quant:  # a type of its own beside the repo's other files here: its own name
            ref = replace(ref, name=f"{ref.name}-{quant.lower()}")
        plan = plan_fetch(_unclaimed(ref), strategy, quant=quant)
        return fetch(plan, registry=_NoReplace(), on_file=on_file, on_bytes=on_bytes)


class PullRefused(OrionError):
    """A client asked this server to download a model, which it does only with ``--allow-fetch``."""
