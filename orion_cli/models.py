"""Model names: the built-in catalog, the local registry, and how a name resolves.

A name resolves in this order: the local registry (models fetched or imported
here) → the catalog (``profiles/models.yaml``) → a local file path → a Hub
repo (``org/repo``) or one file of it (``org/repo/file.gguf``).

The registry is ``$ORION_HOME/models.json``: plain JSON, one entry per name,
written atomically under a lock so concurrent commands do not lose entries.
"""

from __future__ import annotations

import difflib
import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, NotFound
from .paths import orion_home

KINDS = ("llm", "vision", "encoder")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]*$")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    kind: str
    description: str = ""
    pattern: str = "*.gguf"
    projector: str | None = None
    format: str = "gguf"
    files: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    from importlib.resources import files

    from ._yaml import load_yaml

    doc = load_yaml(files("orion_cli.profiles").joinpath("models.yaml").read_text(encoding="utf-8"))
    out = {}
    for name, e in doc["models"].items():
        out[name] = CatalogEntry(
            name=name, repo=e["repo"], kind=e["kind"], description=e.get("description", ""),
            pattern=e.get("pattern", "*.gguf"), projector=e.get("projector"),
            format=e.get("format", "gguf"), files=tuple(e.get("files", ())),
        )
    return out


@dataclass(frozen=True)
class LocalModel:
    """A model on this machine: fetched into the HF cache, or imported from a path."""

    name: str
    kind: str
    path: str  # the GGUF (or, for a safetensors encoder, the snapshot folder)
    source: str  # "hub" or "import"
    file_type: str = ""
    size_bytes: int = 0
    repo: str | None = None
    filename: str | None = None
    projector_path: str | None = None
    projector_filename: str | None = None
    sha256: str | None = None
    added: str = ""

    def exists(self) -> bool:
        return Path(self.path).exists()


@dataclass(frozen=True)
class ModelRef:
    """What a MODEL argument means."""

    name: str  # the name it is (or will be) registered under
    kind: str
    source: str  # "registry", "catalog", "path", "repo"
    repo: str | None = None
    filename: str | None = None
    pattern: str = "*.gguf"
    projector: str | None = None
    format: str = "gguf"
    files: tuple[str, ...] = ()
    local: LocalModel | None = None
    path: Path | None = None


class Registry:
    """The models known on this machine (``$ORION_HOME/models.json``)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or orion_home() / "models.json"

    def _read(self) -> dict[str, LocalModel]:
        """The registry's models; a file that is not one (damaged, a list, a number, entries that are
        not models) is reported with its path and left as it is, byte for byte."""
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except RecursionError as exc:
            raise self._damaged("nested too deeply to be a registry") from exc
        except (OSError, ValueError) as exc:
            raise self._damaged(str(exc)[:120]) from exc
        return self._models(doc)

    def _damaged(self, why: str) -> ConfigError:
        return ConfigError(f"the model registry {self.path} is damaged ({why})",
                           hint="move it away; 'orion import' and 'orion fetch' will write a new one")

    def _models(self, doc) -> dict[str, LocalModel]:
        if not isinstance(doc, dict):
            raise self._damaged(f"a JSON {_json_kind(doc)}, not an object with \"models\"")
        models = doc.get("models", {})
        if not isinstance(models, dict):
            raise self._damaged(f"\"models\" is a JSON {_json_kind(models)}, not an object")
        out = {}
        for name, entry in models.items():
            problem = _entry_problem(entry)
            if problem:
                raise self._damaged(f"the entry {name[:40]!r} {problem}")
            out[name] = LocalModel(**entry)
        return out

    def all(self) -> dict[str, LocalModel]:
        return self._read()

    def get(self, name: str) -> LocalModel | None:
        return self._read().get(name)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, LocalModel]]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            models = self._read()
            yield models
            from ._fs import write_text_atomic

            doc = {"schema_version": 1, "models": {n: asdict(m) for n, m in sorted(models.items())}}
            write_text_atomic(self.path, json.dumps(doc, indent=2) + "\n")

    def add(self, model: LocalModel, *, replace: bool = True) -> None:
        """Register ``model`` under its name. ``replace=False``: a name that already stands for
        another file or folder is refused (the same one is registered again, refreshed)."""
        with self._locked() as models:
            old = models.get(model.name)
            if not replace and old is not None and old.path != model.path:
                from .errors import InvalidValue

                raise InvalidValue(f"a model named {model.name!r} already exists ({old.path})",
                                   hint="choose another --name, 'orion rm' it first, or pass --force to replace it")
            models[model.name] = model

    def remove(self, name: str) -> LocalModel | None:
        with self._locked() as models:
            return models.pop(name, None)


_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "path": (str,), "source": (str,), "file_type": (str,), "size_bytes": (int,),
    "repo": (str, type(None)), "filename": (str, type(None)), "projector_path": (str, type(None)),
    "projector_filename": (str, type(None)), "sha256": (str, type(None)), "added": (str,),
}


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _entry_problem(entry) -> str:
    """What is wrong with one registry entry ('' for nothing): it must be an object with a model's
    fields, each of its type (a path that is a number would end a command later, less clearly)."""
    if not isinstance(entry, dict):
        return f"is a JSON {_json_kind(entry)}, not an object"
    missing = [k for k in ("name", "kind", "path", "source") if k not in entry]
    if missing:
        return f"has no {missing[0]!r}"
    for key, value in entry.items():
        types = _FIELDS.get(key)
        if types is None:
            return f"has an unknown field {str(key)[:40]!r}"
        if isinstance(value, bool) or not isinstance(value, types):
            return f"has a {key} that is a JSON {_json_kind(value)}"
    if not entry["path"]:
        return "has an empty path"
    return ""


def valid_name(name: str) -> str:
    from .errors import InvalidValue

    if not _NAME_RE.match(name):
        raise InvalidValue(f"{name!r} is not a usable model name",
                           hint="use lower-case letters, digits, '.', '_' and '-'")
    return name


def default_name_for(repo: str, filename: str | None = None) -> str:
    base = Path(filename).stem if filename else repo.split("/")[-1]
    base = re.sub(r"-\d{5}-of-\d{5}$", "", base).lower()
    return re.sub(r"[^a-z0-9._\-]+", "-", base).strip("-") or "model"


def local_path(text: str) -> Path | None:
    """The file a MODEL argument names on this machine: the path itself when it exists, else a
    registered model's file; None for a model that is not here (a catalog name, org/repo).
    A path that names nothing (a .gguf name not on disk, one too long for a file) is NotFound;
    ``~user`` for a user not here too (:func:`user_path`)."""
    from ._text import clip

    path = user_path(text)
    if text.strip() and on_disk(path):
        return path
    ref = resolve(text)  # an empty name is refused there
    if ref.source == "path" and not on_disk(ref.path):
        raise NotFound(f"no such file: {clip(ref.path, 200)}", hint="check the path")
    return ref.path


def user_path(text: str, *, hint: str = "give the full path, or a model name ('orion list')") -> Path:
    """``text`` as a path, ``~`` expanded; ``~user`` for a user this machine does not have is
    NotFound (``Path.expanduser`` raises RuntimeError). The one rule for every path the CLI is
    given (MODEL arguments, files to read, -o and the other outputs)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        from ._text import clip

        raise NotFound(f"{clip(text, 200)!r}: there is no home folder {clip(text.split('/')[0], 60)} here",
                       hint=hint) from None


PATH_HINT = "give the full path"  # for a path that is no model (an output, a text file, an image)


def on_disk(path: Path) -> bool:
    """Whether something is at ``path``. A name too long for this file system names nothing (False);
    a folder on the way that may not be searched (a permission) is the machine's error, one line."""
    import errno

    try:
        return path.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        from ._text import clip
        from .errors import from_os_error

        exc.filename = clip(exc.filename, 200) if exc.filename else exc.filename
        raise from_os_error(exc) from None


def output_path(text: str | Path, what: str = "-o", *, temporary: bool = True) -> Path:
    """A path orion is to write, checked before any work: ``~`` expanded (:func:`user_path`); a
    name too long for its file system (``temporary``: or the ``.NAME.PID.partial`` name the file
    is written under first) is refused with the path cut; a folder on the way that may not be
    searched is the machine's error, one line. A missing folder is left to the write (made, or said)."""
    import errno
    import os

    from ._text import clip
    from .errors import InvalidValue, from_os_error

    path = user_path(str(text), hint=PATH_HINT)
    names = [path, path.with_name(f".{path.name}.{os.getpid()}.partial")] if temporary and path.name else [path]
    for candidate in names:
        try:
            os.stat(candidate)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidValue(f"{what} {clip(path, 200)}: the name is too long for this file system",
                                   hint="choose a shorter name") from None
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # missing, or a file on the way: the write says so
                exc.filename = clip(exc.filename, 200) if exc.filename else exc.filename
                raise from_os_error(exc) from None
    return path


def resolve(text: str, registry: Registry | None = None) -> ModelRef:
    """What a MODEL argument names; raises NotFound with suggestions."""
    from ._text import clip

    if not text.strip():  # Path("") is the current folder: never take it for a model
        from .errors import InvalidValue

        raise InvalidValue("an empty model name was given", hint="give a model name ('orion list'), org/repo or a .gguf path")
    registry = registry or Registry()
    local = registry.all()
    if text in local:
        m = local[text]
        return ModelRef(m.name, m.kind, "registry", repo=m.repo, filename=m.filename, local=m, path=Path(m.path))
    cat = catalog()
    if text in cat:
        e = cat[text]
        return ModelRef(e.name, e.kind, "catalog", repo=e.repo, pattern=e.pattern, projector=e.projector,
                        format=e.format, files=e.files)
    path = user_path(text)
    if on_disk(path) or text.endswith(".gguf") and ("/" not in text or text.startswith((".", "/", "~"))):
        return ModelRef(default_name_for("local", path.name), "llm", "path", path=path)
    parts = text.strip("/").split("/")
    if len(parts) >= 3 and parts[-1].endswith(".gguf") and _REPO_RE.match("/".join(parts[:2])):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return ModelRef(default_name_for(repo, filename), "llm", "repo", repo=repo, filename=filename)
    if len(parts) == 2 and _REPO_RE.match(text):
        return ModelRef(default_name_for(text), "llm", "repo", repo=text)
    known = sorted(set(local) | set(cat))
    close = difflib.get_close_matches(text, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    hint += f"known names: {', '.join(known)}; or give a Hub repo (org/repo) or a .gguf path"
    raise NotFound(f"unknown model {clip(text, 200)!r}", hint=hint)


def catalog_entry_for_repo(repo: str) -> CatalogEntry | None:
    return next((e for e in catalog().values() if e.repo == repo), None)





def import_gguf(path: Path, *, name: str | None = None, projector: Path | None = None, replace: bool = False,
                registry: Registry | None = None):
    """Register a local GGUF (and the vision projector that goes with it) under ``name`` (default:
    its file name); the file stays where it is. Returns the model and its header."""
    from ._fs import now_iso
    from .estimate import ENCODER_ARCHITECTURES
    from .gguf_header import read_local_header

    header = read_local_header(path)  # a missing, non-GGUF or damaged file fails here, clearly
    proj_path = None
    if projector is not None:
        read_local_header(projector)
        proj_path = str(projector)
    name = valid_name(name or default_name_for("local", path.name))
    kind = "vision" if proj_path else ("encoder" if header.architecture in ENCODER_ARCHITECTURES else "llm")
    model = LocalModel(name=name, kind=kind, path=str(path), source="import", file_type=header.file_type,
                       size_bytes=header.file_size or path.stat().st_size, projector_path=proj_path, added=now_iso())
    (registry or Registry()).add(model, replace=replace)
    return model, header


def import_encoder_folder(folder: Path, *, name: str | None = None, replace: bool = False,
                          registry: Registry | None = None) -> LocalModel:
    """Register a Hugging Face BERT encoder folder as it is (orion embed converts it to GGUF on first use)."""
    from ._fs import now_iso
    from .convert import read_json
    from .errors import InvalidValue

    config = read_json(folder / "config.json")
    if config.get("model_type") != "bert" or not (folder / "model.safetensors").exists():
        raise InvalidValue(f"{folder} is not a BERT encoder with model.safetensors",
                           hint="orion imports GGUF files and BERT encoder folders")
    name = valid_name(name or default_name_for("local", folder.name))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    model = LocalModel(name=name, kind="encoder", path=str(folder), source="import", file_type="safetensors",
                       size_bytes=size, added=now_iso())
    (registry or Registry()).add(model, replace=replace)
    return model


def projector_shared(registry: Registry, model: LocalModel) -> bool:
    """Whether another registered model uses ``model``'s projector file (then it stays)."""
    return any(m.projector_path == model.projector_path and m.name != model.name
               for m in registry.all().values())


def remove_model(name: str, registry: Registry | None = None) -> tuple[LocalModel, int]:
    """Forget a model, and delete a fetched one's files from the Hugging Face cache (its projector
    too, unless another model shares it); an imported model's own file is never touched.
    Returns the model and the bytes freed."""
    registry = registry or Registry()
    model = registry.get(name)
    if model is None:
        close = difflib.get_close_matches(name, list(registry.all()), n=1)
        raise NotFound(f"no model named {name!r} here",
                       hint=(f"did you mean {close[0]!r}? " if close else "") + "see 'orion list'")
    keep_projector = projector_shared(registry, model)
    # forgotten first: a registry that cannot be written (a full disk) loses nothing; files that
    # then fail to go are orphans in the cache, never a model whose file is gone
    registry.remove(name)
    freed = 0
    if model.source == "hub" and model.repo:
        from . import hub

        if model.file_type == "safetensors":
            folder = Path(model.path)
            for f in [p for p in folder.rglob("*") if p.is_symlink() or p.is_file()]:
                freed += hub.delete_cached(model.repo, str(f.relative_to(folder)))
        else:
            from .gguf_files import split_group

            for part in split_group(model.filename or Path(model.path).name):
                freed += hub.delete_cached(model.repo, part)
            if model.projector_filename and not keep_projector:
                freed += hub.delete_cached(model.repo, model.projector_filename)
    return model, freed
