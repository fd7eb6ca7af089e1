"""Fetching a model published as safetensors (an encoder): its listed files, whole, into the Hugging
Face cache, registered as the snapshot folder (GGUF models are chosen and fetched by :mod:`.fetch`)."""

from __future__ import annotations

from pathlib import Path

from ._fs import now_iso
from .errors import NotFound
from .models import LocalModel, ModelRef, Registry


def snapshot_files(ref: ModelRef, listing=None) -> list:
    """The files :func:`fetch_snapshot` downloads (the Hub's listing entries)."""
    from . import hub

    listing = listing or hub.list_files(ref.repo)
    wanted = [f for f in listing.files if f.path in ref.files] if ref.files else list(listing.files)
    if not any(f.path.endswith(".safetensors") for f in wanted):
        raise NotFound(f"{ref.repo} has no .safetensors weights", hint="orion reads safetensors or GGUF models")
    return wanted


def fetch_snapshot(ref: ModelRef, *, name: str | None = None, registry: Registry | None = None) -> LocalModel:
    """Download the listed files of a safetensors model (an encoder) and register its snapshot folder."""
    from . import hub

    listing = hub.list_files(ref.repo)
    wanted = snapshot_files(ref, listing)
    paths = [hub.download(ref.repo, f) for f in wanted]
    first = paths[0]
    folder = first.parents[len(Path(wanted[0].path).parts) - 1]
    model = LocalModel(
        name=name or ref.name, kind=ref.kind, path=str(folder), source="hub", file_type="safetensors",
        size_bytes=sum(f.size or 0 for f in wanted), repo=ref.repo, added=now_iso(),
    )
    (registry or Registry()).add(model)
    return model
