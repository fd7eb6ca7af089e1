"""Everything orion says to the Hugging Face Hub goes through this module.

- :func:`list_files` — a repo's files with sizes and LFS sha256 (``model_info``).
- :class:`RemoteFile` — a :class:`~orion_cli.gguf_header.ByteSource` over HTTP
  range requests, so GGUF headers are read without downloading the weights.
- :func:`download` — a file into the standard Hugging Face cache, resumable.

huggingface_hub 2.x writes each download to a process-unique temporary file
and deletes it on failure (its PR #4228), so an interrupted download always
starts again from zero. orion keeps the bytes instead: it streams the blob
itself with huggingface_hub's ``http_get`` into ``blobs/<sha256>.orion-partial``
(resuming with a Range request), verifies the sha256 the Hub states for the
LFS file, renames it to the blob name, and lets ``hf_hub_download`` link it
into ``snapshots/`` and ``refs/`` — one copy, the cache layout every HF tool reads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import DoesNotFit, NetworkError, NotFound, OrionError
from .paths import hf_cache_dir
from .units import format_bytes

PARTIAL_SUFFIX = ".orion-partial"


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    sha256: str | None  # LFS files only


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    commit: str | None
    files: tuple[RepoFile, ...]

    def get(self, path: str) -> RepoFile | None:
        return next((f for f in self.files if f.path == path), None)


def endpoint() -> str | None:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


@contextmanager
def hub_errors(repo_id: str, filename: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and HTTP errors into orion's one-line errors."""
    import httpx2
    from huggingface_hub import errors as hf

    what = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except OrionError:
        raise
    except hf.GatedRepoError as exc:
        raise NetworkError(f"{repo_id} is gated", hint="accept its licence on the Hub and set HF_TOKEN") from exc
    except hf.RepositoryNotFoundError as exc:
        raise NotFound(f"no repository {repo_id} on the Hub",
                       hint="check the name (org/repo), or set HF_TOKEN for a private repo") from exc
    except hf.RevisionNotFoundError as exc:
        raise NotFound(f"{repo_id} has no such revision", hint="check --revision") from exc
    except (hf.EntryNotFoundError, hf.RemoteEntryNotFoundError) as exc:
        raise NotFound(f"no file {what} on the Hub", hint=f"run 'orion inspect {repo_id}' to list its files") from exc
    except (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError) as exc:
        raise NetworkError(f"{what} is not in the local cache and HF_HUB_OFFLINE is set",
                           hint="fetch it on a connected machine, or unset HF_HUB_OFFLINE") from exc
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise NetworkError(f"the Hub answered HTTP {status} for {what}", hint="try again later") from exc
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as exc:
        raise NetworkError(f"cannot reach the Hub ({endpoint() or 'https://huggingface.co'}) for {what}: {exc}",
                           hint="check the network, or set HF_HUB_OFFLINE=1 to use cached files only") from exc


def _offline_guard(what: str) -> None:
    if is_offline():
        raise NetworkError(f"{what} needs the Hub, and HF_HUB_OFFLINE is set",
                           hint="unset HF_HUB_OFFLINE, or use a model already fetched ('orion list')")


def list_files(repo_id: str, revision: str | None = None) -> RepoListing:
    """The files of a model repo, with sizes and the sha256 of LFS files.

    One GET of the Hub's model-info endpoint with ``blobs=true`` (what
    ``HfApi.model_info(files_metadata=True)`` sends), through huggingface_hub's
    session and error mapping, without importing ``hf_api`` (0.2 s).
    """
    _offline_guard(f"listing {repo_id}")
    from urllib.parse import quote

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    base = (endpoint() or constants.ENDPOINT).rstrip("/")
    url = f"{base}/api/models/{repo_id}" + (f"/revision/{quote(revision, safe='')}" if revision else "")
    with hub_errors(repo_id):
        response = get_session().get(url, headers=build_hf_headers(token=_token()), params={"blobs": True},
                                     timeout=30)
        hf_raise_for_status(response)
        data = response.json()
    files = tuple(
        RepoFile(s["rfilename"], s.get("size"), (s.get("lfs") or {}).get("sha256"))
        for s in data.get("siblings") or []
    )
    return RepoListing(repo_id, data.get("sha"), files)


def file_url(repo_id: str, filename: str, revision: str | None = None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())


class RemoteFile:
    """Random access to a file on the Hub through HTTP range requests."""

    def __init__(self, repo_id: str, filename: str, size: int | None, revision: str | None = None) -> None:
        self.repo_id = repo_id
        self.filename = filename
        self.name = f"{repo_id}/{filename}"
        self.size = size
        self.url = file_url(repo_id, filename, revision)
        self.bytes_read = 0

    def read_at(self, offset: int, n: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = build_hf_headers(token=_token())
        headers["Range"] = f"bytes={offset}-{offset + n - 1}"
        headers["Accept-Encoding"] = "identity"
        with hub_errors(self.repo_id, self.filename):
            response = get_session().get(self.url, headers=headers, follow_redirects=True, timeout=60)
            if response.status_code >= 400:
                from huggingface_hub.utils import hf_raise_for_status

                hf_raise_for_status(response)
        data = response.content
        if response.status_code == 200:  # the server ignored Range: take the slice
            data = data[offset : offset + n]
        self.bytes_read += len(data)
        return data


def read_remote_header(repo_id: str, filename: str, size: int | None, revision: str | None = None):
    """The GGUF header of a file on the Hub, read with range requests only."""
    from .gguf_header import read_header_part

    _offline_guard(f"reading the header of {repo_id}/{filename}")
    return read_header_part(RemoteFile(repo_id, filename, size, revision))


def read_remote_header_bytes(repo_id: str, filename: str, size: int | None, n: int, revision: str | None = None) -> bytes:
    """The first ``n`` bytes of a file on the Hub (its header, for llama.cpp's dry run), one range request."""
    _offline_guard(f"reading the header of {repo_id}/{filename}")
    return RemoteFile(repo_id, filename, size, revision).read_at(0, n)


# ---------------------------------------------------------------- the cache


def storage_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return (cache_dir or hf_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The file's path in the HF cache if it is there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    return Path(found) if isinstance(found, str) and os.path.exists(found) else None


def bytes_on_disk(repo_id: str, file: RepoFile | None, revision: str | None = None) -> int:
    """What of ``file`` the cache already holds: all of it when it is cached, else the bytes of the
    partial download a fetch will resume (no network)."""
    if file is None:
        return 0
    found = cached_file(repo_id, file.path, revision)
    if found is not None:
        return found.stat().st_size
    if file.sha256:  # an LFS file's partial download is named by its sha256 (the Hub's ETag for it)
        partial = storage_folder(repo_id) / "blobs" / (file.sha256 + PARTIAL_SUFFIX)
        try:
            return partial.stat().st_size
        except OSError:
            return 0
    return 0


class _HashingWriter:
    """A file opened for append that hashes what is written, on a second thread.

    hashlib releases the GIL on large buffers, so the sha256 of one chunk runs
    while the next arrives from the network: verifying costs no extra wall time.
    """

    def __init__(self, f, digest, on_bytes: Callable[[int], None] | None) -> None:
        import queue
        import threading

        self._f = f
        self._digest = digest
        self._on_bytes = on_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._worker = threading.Thread(target=self._hash_loop, daemon=True)
        self._worker.start()

    def _hash_loop(self) -> None:
        while (data := self._queue.get()) is not None:
            self._digest.update(data)

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self._queue.put(data)
        if self._on_bytes:
            self._on_bytes(len(data))
        return n

    def finish(self) -> str:
        """Wait for the hash of everything written; its hex digest."""
        self._queue.put(None)
        self._worker.join()
        return self._digest.hexdigest()

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, *args):
        return self._f.seek(*args)

    def truncate(self, *args):
        return self._f.truncate(*args)

    def flush(self) -> None:
        self._f.flush()


def _hash_existing(path: Path, digest) -> int:
    size = 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
            size += len(block)
    return size


def download(
    repo_id: str,
    file: RepoFile,
    *,
    revision: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Download one file into the HF cache, resuming a partial download; returns its path.

    ``on_start(total, already)`` is called once with the file size and the bytes
    already on disk; ``on_bytes(n)`` for each chunk written.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    cache = hf_cache_dir()
    existing = cached_file(repo_id, file.path, revision)
    if existing is not None and not is_offline():
        if on_start:
            on_start(file.size or existing.stat().st_size, file.size or existing.stat().st_size)
        return existing
    if is_offline():
        if existing is not None:
            return existing
        raise NetworkError(f"{repo_id}/{file.path} is not in the local cache and HF_HUB_OFFLINE is set",
                           hint="fetch it on a connected machine, or unset HF_HUB_OFFLINE")

    url = file_url(repo_id, file.path, revision)
    with hub_errors(repo_id, file.path):
        meta = get_hf_file_metadata(url, token=_token(), endpoint=endpoint())
    total = meta.size if meta.size is not None else file.size
    blobs = storage_folder(repo_id, cache) / "blobs"
    blob = blobs / meta.etag
    partial = blobs / (meta.etag + PARTIAL_SUFFIX)

    with _download_lock(cache, blob):  # another orion fetching the same file: wait, then reuse its blob
        _download_blob(repo_id, file, url, meta, total, blob, partial, on_start, on_bytes)

    # The blob is in place: hf_hub_download only links it into snapshots/ and refs/.
    with disable_progress_bars(), hub_errors(repo_id, file.path):
        path = hf_hub_download(repo_id, file.path, revision=revision, cache_dir=str(cache),
                               endpoint=endpoint(), token=_token())
    return Path(path)


@contextmanager
def _download_lock(cache: Path, blob: Path) -> Iterator[None]:
    """An exclusive lock per blob, beside huggingface_hub's own (``.locks/<repo>/``), so that two
    processes never write one partial file; a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = cache / ".locks" / blob.parent.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{blob.name}.orion.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_blob(repo_id: str, file: RepoFile, url: str, meta, total: int | None, blob: Path, partial: Path,
                   on_start: Callable[[int, int], None] | None, on_bytes: Callable[[int], None] | None) -> None:
    """The blob, downloaded (resumed from ``partial``) and verified, unless it is already there."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars

    blobs = blob.parent
    if not blob.exists():
        blobs.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        have = _hash_existing(partial, digest) if partial.exists() else 0
        if total is not None and have > total:  # not ours to trust: start over
            partial.unlink()
            digest, have = hashlib.sha256(), 0
        if total is not None:
            free = shutil.disk_usage(blobs).free
            if free < total - have:
                raise DoesNotFit(
                    f"{file.path} needs {format_bytes(total - have)} more on disk, {format_bytes(free)} is free at {blobs}",
                    hint="free some space (orion rm NAME) or set HF_HOME to a larger disk",
                )
        if on_start:
            on_start(total or 0, have)
        headers = build_hf_headers(token=_token())
        with partial.open("ab") as f, disable_progress_bars(), hub_errors(repo_id, file.path):
            writer = _HashingWriter(f, digest, on_bytes)
            try:
                http_get(meta.location or url, writer, resume_size=have, headers=headers, expected_size=total)
            finally:
                got_sha = writer.finish()
        expected_sha = file.sha256 or (meta.etag if len(meta.etag) == 64 else None)
        if expected_sha and got_sha != expected_sha:
            partial.unlink(missing_ok=True)
            raise NetworkError(
                f"{file.path} arrived corrupted (sha256 {got_sha[:12]}…, the Hub says {expected_sha[:12]}…)",
                hint="the partial file was removed; run the command again",
            )
        os.replace(partial, blob)
    elif on_start:
        on_start(total or 0, total or 0)


def delete_cached(repo_id: str, filename: str) -> int:
    """Remove one file from the HF cache (its snapshot links, and its blob once unreferenced).

    Returns the bytes freed. Never touches anything outside the cache folder of the repo.
    """
    folder = storage_folder(repo_id)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return 0
    blobs_to_check: set[Path] = set()
    for snap in snapshots.iterdir():
        link = snap / filename
        if link.is_symlink() or link.exists():
            if link.is_symlink():
                blobs_to_check.add((link.parent / os.readlink(link)).resolve())
            link.unlink()
    freed = 0
    still_used = {
        (p.parent / os.readlink(p)).resolve() for p in snapshots.rglob("*") if p.is_symlink()
    }
    for blob in blobs_to_check:
        if blob.exists() and blob not in still_used and folder.resolve() in blob.parents:
            freed += blob.stat().st_size
            blob.unlink()
    return freed
