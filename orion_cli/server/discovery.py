"""How the CLI finds a running ``orion serve``: ``$ORION_HOME/server.json`` or ``ORION_HOST``.

Standard library only: every ``orion run``/``embed``/``search`` reads this before deciding
whether to work in-process, so it must cost nothing at start-up.
"""

from __future__ import annotations

import http.client
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from .._proc import alive
from ..paths import orion_home

SERVER_FILE = "server.json"
DEFAULT_PORT = 11435


@dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    pid: int = 0  # 0: named by ORION_HOST, not started from this ORION_HOME
    started_at: str = ""
    auth: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def server_file(env: Mapping[str, str] | None = None) -> Path:
    return orion_home(env) / SERVER_FILE


def write_server_file(info: ServerInfo) -> Path:
    """Write the discovery file (mode 0600, atomically)."""
    path = server_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove_server_file(pid: int) -> None:
    """Remove the discovery file if it is this server's."""
    info = read_server_file()
    if info is not None and info.pid == pid:
        server_file().unlink(missing_ok=True)


def read_server_file() -> ServerInfo | None:
    try:
        doc = json.loads(server_file().read_text())
        return ServerInfo(str(doc["host"]), int(doc["port"]), int(doc.get("pid", 0)), str(doc.get("started_at", "")),
                          bool(doc.get("auth", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def healthy(info: ServerInfo, timeout: float = 2.0) -> bool:
    try:
        conn = http.client.HTTPConnection(info.host, info.port, timeout=timeout)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def parse_host(text: str) -> ServerInfo:
    """``ORION_HOST``: ``host:port``, ``http://host:port`` or a bare host (the default port)."""
    text = text.strip().removeprefix("http://").rstrip("/")
    if text.startswith("["):  # [::1]:port
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return ServerInfo(host or "127.0.0.1", int(port) if port.isdigit() else DEFAULT_PORT)


def live_server(env: Mapping[str, str] | None = None, *, health=None) -> ServerInfo | None:
    """The server the CLI should use: ``ORION_HOST``, else a live one from the discovery file.

    A file whose pid is dead is stale and removed. ``health(info) -> bool`` (the client's
    ``/health`` probe by default) must answer for the server to count.
    """
    env = os.environ if env is None else env
    if health is None:
        health = healthy
    if env.get("ORION_HOST"):
        info = parse_host(env["ORION_HOST"])
        return info if health(info) else None
    info = read_server_file()
    if info is None:
        return None
    if info.pid <= 0 or not alive(info.pid):
        server_file(env).unlink(missing_ok=True)
        return None
    return info if health(info) else None
