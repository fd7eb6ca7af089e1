"""A Hub-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It serves real files through the endpoints huggingface_hub calls, so orion's
real huggingface_hub code path is what runs:

- ``GET /api/models/{repo}[/revision/{rev}]`` — model info with siblings, sizes and LFS sha256
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` — the file listing
- ``HEAD|GET /{repo}/resolve/{rev}/{file}`` — ETag / X-Repo-Commit / X-Linked-* headers, Range requests

It counts the bytes it sends per file and can signal (a threading.Event) once
a file has sent a given number of bytes, so a test can kill a client mid-download
without sleeping. ``rate_bytes_per_s`` slows transfers down for such tests.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class HubFile:
    path: Path
    size: int
    sha256: str
    lfs: bool


@dataclass
class HubRepo:
    files: dict[str, HubFile] = field(default_factory=dict)
    commit: str = ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.bytes_sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.rate_bytes_per_s: float | None = None
        self._watch: tuple[str, int, threading.Event] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ content

    def add_file(self, repo_id: str, filename: str, path: Path, *, lfs: bool | None = None, sha256: str | None = None) -> None:
        path = Path(path)
        repo = self.repos.setdefault(repo_id, HubRepo())
        is_lfs = path.suffix in (".gguf", ".safetensors", ".bin") if lfs is None else lfs
        repo.files[filename] = HubFile(path, path.stat().st_size, sha256 or _sha256(path), is_lfs)
        repo.commit = hashlib.sha1(
            json.dumps(sorted((n, f.sha256) for n, f in repo.files.items())).encode()
        ).hexdigest()

    def watch(self, filename: str, after_bytes: int) -> threading.Event:
        """An event set once ``filename`` has sent at least ``after_bytes`` in total."""
        event = threading.Event()
        self._watch = (filename, after_bytes, event)
        return event

    def sent(self, filename: str) -> int:
        with self._lock:
            return self.bytes_sent.get(filename, 0)

    # ------------------------------------------------------------ server

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LoopbackHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------ handlers

    def _error(self, h, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, data, head: bool) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _handle(self, h, head: bool) -> None:
        parsed = urlparse(h.path)
        path = unquote(parsed.path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
            if rest[:1] == ["tree"]:
                return self._json(h, self._tree(repo), head)
            return self._json(h, self._info(repo_id, repo), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = "/".join(parts[:2])
            filename = "/".join(parts[4:])
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._error(h, 404, "RepoNotFound", f"Repository {repo_id} not found")
            entry = repo.files.get(filename)
            if entry is None:
                return self._error(h, 404, "EntryNotFound", f"{filename} does not exist in {repo_id}")
            return self._send_file(h, repo, filename, entry, head)
        return self._error(h, 404, "RepoNotFound", "not found")

    def _info(self, repo_id: str, repo: HubRepo) -> dict:
        siblings = []
        for name, f in sorted(repo.files.items()):
            sib = {"rfilename": name, "size": f.size, "blobId": hashlib.sha1(f.sha256.encode()).hexdigest()}
            if f.lfs:
                sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(sib)
        return {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "tags": ["gguf"],
                "siblings": siblings}

    def _tree(self, repo: HubRepo) -> list:
        out = []
        for name, f in sorted(repo.files.items()):
            item = {"type": "file", "path": name, "size": f.size, "oid": hashlib.sha1(f.sha256.encode()).hexdigest()}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(item)
        return out

    def _send_file(self, h, repo: HubRepo, filename: str, f: HubFile, head: bool) -> None:
        start, end = 0, f.size - 1
        rng = h.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else max(0, f.size - int(b))
            end = min(int(b), f.size - 1) if (a and b) else f.size - 1
            if start >= f.size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{f.size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        etag = f.sha256 if f.lfs else hashlib.sha1(f.sha256.encode()).hexdigest()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", repo.commit)
        if f.lfs:
            h.send_header("X-Linked-Etag", f'"{f.sha256}"')
            h.send_header("X-Linked-Size", str(f.size))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        h.end_headers()
        if head:
            return
        remaining = end - start + 1
        chunk = 1 << 20
        began = time.monotonic()
        sent_here = 0
        try:
            with f.path.open("rb") as src:
                src.seek(start)
                while remaining > 0:
                    block = src.read(min(chunk, remaining))
                    if not block:
                        break
                    h.wfile.write(block)
                    remaining -= len(block)
                    sent_here += len(block)
                    self._count(filename, len(block))
                    if self.rate_bytes_per_s:
                        ahead = sent_here / self.rate_bytes_per_s - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)  # rate limiting the transfer, not test synchronisation
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _count(self, filename: str, n: int) -> None:
        with self._lock:
            total = self.bytes_sent.get(filename, 0) + n
            self.bytes_sent[filename] = total
        if self._watch and self._watch[0] == filename and total >= self._watch[1]:
            self._watch[2].set()


if __name__ == "__main__":  # serve a folder of files as one repo: python tests/hubserver.py org/repo DIR
    import sys

    hub = LoopbackHub()
    for p in sorted(Path(sys.argv[2]).iterdir()):
        if p.is_file():
            hub.add_file(sys.argv[1], p.name, p)
    hub.start()
    print(hub.url, flush=True)
    threading.Event().wait()
