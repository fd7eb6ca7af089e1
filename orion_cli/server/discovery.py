"""How the CLI finds a running ``orion serve``: ``$ORION_HOME/server.json`` or ``ORION_HOST``.

Standard library only: every ``orion run``/``embed``/``search`` reads this before deciding
whether to work in-process, so it must cost nothing at start-up.

- **One server per home**: :func:`lock_home` takes ``$ORION_HOME/server.lock`` (``flock``, held for
  the server's life, let go by the kernel however the process ends) before the server binds; a
  second server finds it held and names the first.
- **The discovery file** is trusted only as a regular file of at most 64 KiB, owned by this user,
  that no one else can write, holding the fields :func:`write_server_file` writes; it is read
  without following a link and without blocking (a FIFO or ``/dev/zero`` there is ignored).
- **A server counts** only when its ``/health`` says ``"service": "orion"``, this ``ORION_HOME``,
  and the pid the file names: a port reused by another program, or another home's server, is not
  taken for this one.
- **Deadlines**: a connection must open within :data:`CONNECT_TIMEOUT_S`; ``/health`` must answer
  within :func:`health_timeout`; a request waits :func:`server_timeout` seconds
  (``ORION_SERVER_TIMEOUT``) for each byte before it asks ``/health`` whether the server still runs
  (see :mod:`.client`).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from .._proc import alive
from ..paths import orion_home

SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
DEFAULT_PORT = 11435
MAX_FILE_BYTES = 64 * 1024  # a discovery file is ~150 bytes: anything past this is not one
SERVICE = "orion"  # what /health names itself
FILE_FIELDS = ("host", "port", "pid", "started_at", "auth")  # what server.json holds

CONNECT_TIMEOUT_S = 2.0  # loopback connects in microseconds; a LAN host in milliseconds
HEALTH_TIMEOUT_S = 5.0  # /health is answered on the event loop, with no model work: seconds mean stopped
DEFAULT_SERVER_TIMEOUT_S = 30.0
SERVER_TIMEOUT_ENV = "ORION_SERVER_TIMEOUT"

Notice = Callable[[str], None]


@dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    pid: int = 0  # 0: named by ORION_HOST, not started from this ORION_HOME
    started_at: str = ""
    auth: bool = False
    # what its /health says clients may name beyond its registered models (orion serve --allow-paths,
    # --allow-fetch); not in the discovery file, and not part of which server this is
    allow_paths: bool = field(default=False, compare=False)
    allow_fetch: bool = field(default=False, compare=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def server_file(env: Mapping[str, str] | None = None) -> Path:
    return orion_home(env) / SERVER_FILE


def lock_file(env: Mapping[str, str] | None = None) -> Path:
    return orion_home(env) / LOCK_FILE


# ---------------------------------------------------------------- deadlines


def server_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds a request waits for the server's next byte before asking ``/health`` whether it still
    runs (``ORION_SERVER_TIMEOUT``, default 30)."""
    env = os.environ if env is None else env
    text = (env.get(SERVER_TIMEOUT_ENV) or "").strip()
    if not text:
        return DEFAULT_SERVER_TIMEOUT_S
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:  # nan too
        from ..errors import ConfigError

        raise ConfigError(f"{SERVER_TIMEOUT_ENV}={text!r} is not a number of seconds",
                          hint="write seconds above 0, like 30 or 2.5 (or unset it for 30)")
    return value


def health_timeout(env: Mapping[str, str] | None = None) -> float:
    """How long ``/health`` may take: 5 s, or ``ORION_SERVER_TIMEOUT`` when that is shorter."""
    return min(HEALTH_TIMEOUT_S, server_timeout(env))


class NoAnswer(Exception):
    """Nothing answered ``/health`` in time (refused, reset, or silent)."""


def health_doc(info: ServerInfo, timeout: float = HEALTH_TIMEOUT_S) -> object:
    """What answers ``GET /health`` at ``info``: its JSON document (any shape; ``None`` for a body
    that is not JSON or a status that is not 200). Raises :class:`NoAnswer` when nothing answers
    within ``timeout`` (the connection within :data:`CONNECT_TIMEOUT_S`)."""
    conn = http.client.HTTPConnection(info.host, info.port, timeout=min(CONNECT_TIMEOUT_S, timeout))
    try:
        conn.connect()
        conn.sock.settimeout(timeout)
        conn.request("GET", "/health", headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_FILE_BYTES + 1)
    except TimeoutError as exc:
        raise NoAnswer(f"no answer within {timeout:g} s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise NoAnswer(str(exc) or type(exc).__name__) from exc
    finally:
        conn.close()
    if response.status != 200 or len(body) > MAX_FILE_BYTES:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def resolved_home(env: Mapping[str, str] | None = None) -> str:
    """``ORION_HOME`` as ``/health`` names it: absolute, links resolved."""
    return str(orion_home(env).expanduser().resolve())


def not_this_server(doc: object, info: ServerInfo, home: str | None) -> str | None:
    """Why the ``/health`` document ``doc`` is not the server ``info`` names (None: it is).
    ``home`` None: any home (a server named by ``ORION_HOST``)."""
    if not isinstance(doc, dict) or doc.get("service") != SERVICE:
        return f"what answers at {info.url} is not orion serve"
    if home is not None and doc.get("home") != home:
        return f"the orion serve at {info.url} serves another ORION_HOME ({str(doc.get('home'))[:200]})"
    if info.pid > 0 and doc.get("pid") != info.pid:
        return f"the orion serve at {info.url} is pid {str(doc.get('pid'))[:20]}, not pid {info.pid}"
    return None


def with_policy(info: ServerInfo, doc: dict) -> ServerInfo:
    """``info`` with what the server's ``/health`` document says clients may name (a server that
    does not say: only its registered models)."""
    return replace(info, allow_paths=doc.get("allow_paths") is True, allow_fetch=doc.get("allow_fetch") is True)


# ---------------------------------------------------------------- the discovery file


def _what(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_flags(*more: int) -> int:
    flags = os.O_RDONLY
    for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "O_NOCTTY"):
        flags |= getattr(os, name, 0)
    for flag in more:
        flags |= flag
    return flags


def _trust_problem(st: os.stat_result) -> str | None:
    """Why a file with this ``fstat`` is not to be trusted as orion's (None: it is)."""
    if not stat.S_ISREG(st.st_mode):
        return _what(st.st_mode)
    if hasattr(os, "getuid"):
        if st.st_uid != os.getuid():
            return f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
        if st.st_mode & 0o022:
            return f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


@dataclass(frozen=True)
class FileCheck:
    """What ``$ORION_HOME/server.json`` holds: the server it names, or why it is ignored."""

    info: ServerInfo | None = None
    problem: str | None = None  # None with no info: there is no file
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read: only that one is removed


def _parse(data: bytes) -> ServerInfo | None:
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    host, port, pid = doc.get("host"), doc.get("port"), doc.get("pid", 0)
    started, auth = doc.get("started_at", ""), doc.get("auth", False)
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (port, pid))
    if not (isinstance(host, str) and host and len(host) <= 255 and ints_ok and 0 < port <= 65535
            and 0 <= pid < 2**31 and isinstance(started, str) and isinstance(auth, bool)):
        return None
    return ServerInfo(host, port, pid, started, auth)


def check_server_file(env: Mapping[str, str] | None = None) -> FileCheck:
    """Read the discovery file without following a link or blocking: a regular file owned by this
    user, at most :data:`MAX_FILE_BYTES`, holding what :func:`write_server_file` writes."""
    path = server_file(env)
    try:
        fd = os.open(path, _open_flags())
    except FileNotFoundError:
        return FileCheck()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return FileCheck(problem="a symbolic link")
        return FileCheck(problem=f"cannot be read ({exc.strerror or exc})")
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        problem = _trust_problem(st)
        if problem is None and st.st_size > MAX_FILE_BYTES:
            problem = f"{st.st_size} bytes, more than a discovery file ever holds"
        if problem is not None:
            return FileCheck(problem=problem, ident=ident)
        data = os.read(fd, MAX_FILE_BYTES + 1)  # a regular file: never blocks
    except OSError as exc:
        return FileCheck(problem=f"cannot be read ({exc.strerror or exc})")
    finally:
        os.close(fd)
    info = _parse(data) if len(data) <= MAX_FILE_BYTES else None
    if info is None:
        return FileCheck(problem="not orion's discovery file (not the JSON orion serve writes)", ident=ident)
    return FileCheck(info=info, ident=ident)


def read_server_file(env: Mapping[str, str] | None = None) -> ServerInfo | None:
    return check_server_file(env).info


def _remove_if_same(path: Path, ident: tuple[int, int] | None) -> None:
    """Remove the discovery file if it is still the one read (a server starting meanwhile wrote a
    new file, under a new inode: that one stays)."""
    if ident is None:
        return
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            path.unlink()
    except OSError:
        pass


def write_server_file(info: ServerInfo) -> Path:
    """Write the discovery file (mode 0600, atomically: a temporary file renamed over it)."""
    path = server_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({k: v for k, v in asdict(info).items() if k in FILE_FIELDS}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def remove_server_file(pid: int) -> None:
    """Remove the discovery file if it is this server's."""
    check = check_server_file()
    if check.info is not None and check.info.pid == pid:
        _remove_if_same(server_file(), check.ident)


def replaceable_problem(env: Mapping[str, str] | None = None) -> str | None:
    """Why ``orion serve`` must not replace what is at ``server.json`` (None: nothing is there, or a
    regular file of this user's: a stale one, replaced)."""
    try:
        st = os.lstat(server_file(env))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid()):
        return None
    return _what(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}, not by this user"


# ---------------------------------------------------------------- finding the server


HOST_ENV = "ORION_HOST"
# a DNS name or an IPv4 address, ASCII: labels of 1 to 63 characters (the resolver's idna step fails on others)
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,62})(?:\.[A-Za-z0-9_\-]{1,63})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_host(text: str) -> ServerInfo:
    """``ORION_HOST``: ``host:port``, ``[v6]:port``, ``http://`` before either, or a bare host or
    IPv6 address (the default port). Anything else (a port past 65535, a space or a control
    character, a path, another scheme) is one :class:`~orion_cli.errors.ConfigError`."""
    import ipaddress

    from .._text import clip

    def refuse(why: str) -> Exception:
        from ..errors import ConfigError

        return ConfigError(f"{HOST_ENV}={ascii(clip(text, 60))} is not a host[:port] ({why})",
                           hint=f"write host:port, like 127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT} "
                                f"or http://myhost:{DEFAULT_PORT} (or unset it)")

    if any(c.isspace() or not c.isprintable() for c in text):
        raise refuse("it holds a space or a control character")
    rest = text[7:] if text[:7].lower() == "http://" else text
    if rest.endswith("/") and rest.count("/") == 1:  # http://host:port/
        rest = rest[:-1]
    if "://" in rest:
        raise refuse("orion serve speaks plain http://")
    if "/" in rest or "@" in rest or "?" in rest or "#" in rest:
        raise refuse("a path, a user or a query is not part of one")
    if rest.startswith("["):  # [::1] or [::1]:port
        host, bracket, port = rest[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise refuse("an IPv6 address goes in brackets: [::1]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"{ascii(host[:60])} is not an IPv6 address") from None
        port = port[1:] if port else None
    elif rest.count(":") > 1:  # a bare IPv6 address: the default port
        try:
            ipaddress.IPv6Address(rest)
        except ValueError:
            raise refuse("more than one ':' and not an IPv6 address; a port after one goes [v6]:port") from None
        host, port = rest, None
    else:
        host, colon, port = rest.partition(":")
        port = port if colon else None
        if host and not _HOST_NAME.fullmatch(host):
            raise refuse("the host is not an address, nor a name of labels of 1 to 63 letters, digits, - or _")
    if port is None:
        number = DEFAULT_PORT
    elif not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
        raise refuse(f"the port {ascii(clip(port, 24))} is not one from 1 to 65535")
    else:
        number = int(port)
    return ServerInfo(host or "127.0.0.1", number)


def live_server(env: Mapping[str, str] | None = None, *, health: Callable[[ServerInfo], object] | None = None,
                notice: Notice | None = None) -> ServerInfo | None:
    """The server the CLI should use: ``ORION_HOST``, else a live one from the discovery file.

    A file whose pid is dead, or whose port answers as something else than this home's orion serve
    (another program, another home's server), is stale and removed. ``health(info)`` (the
    ``/health`` probe by default) returns the document, or raises :class:`NoAnswer`. ``notice``
    gets one line when a server or file is there but not used (it did not answer, it is not orion,
    the file is not one to trust); nothing when there simply is no server. The server returned
    carries what its ``/health`` says clients may name (``allow_paths``, ``allow_fetch``).
    """
    env = os.environ if env is None else env
    say = notice or (lambda line: None)
    if health is None:
        timeout = health_timeout(env)

        def health(info: ServerInfo) -> object:
            return health_doc(info, timeout)

    if env.get("ORION_HOST"):
        info = parse_host(env["ORION_HOST"])
        try:
            doc = health(info)
            why = not_this_server(doc, info, None)
        except NoAnswer as exc:
            why = f"orion serve at {info.url} (ORION_HOST) did not answer /health: {exc}"
        if why is not None:
            say(why)
            return None
        return with_policy(info, doc)
    path = server_file(env)
    check = check_server_file(env)
    if check.problem is not None:
        say(f"ignoring {path}: {check.problem}")
        return None
    info = check.info
    if info is None:
        return None
    if info.pid <= 0 or not alive(info.pid):
        _remove_if_same(path, check.ident)
        return None
    try:
        doc = health(info)
    except NoAnswer as exc:  # frozen, or busy past the deadline: left in place, not used now
        say(f"orion serve at {info.url} (pid {info.pid}) did not answer /health: {exc}")
        return None
    why = not_this_server(doc, info, resolved_home(env))
    if why is not None:
        _remove_if_same(path, check.ident)
        say(f"a stale server.json: {why}")
        return None
    return with_policy(info, doc)


# ---------------------------------------------------------------- one server per home


class HomeLocked(Exception):
    """Another process holds ``server.lock``: ``pid`` (0 when it has not written it yet)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.pid = pid


class HomeLock:
    """``$ORION_HOME/server.lock``, held (``flock``, exclusive) while this object is open."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd, self.path = fd, path

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with the last descriptor of this open file

    def __del__(self) -> None:
        self.close()


def _lock_holder(path: Path, wait_s: float = 1.0) -> int:
    """The pid the holder wrote into the lock file (it writes it just after locking, over a killed
    holder's: wait for a live one a moment); 0 if none came."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, _open_flags())
            try:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
        except OSError:
            text = ""
        if text.isdigit() and alive(int(text)):  # a dead pid: a killed holder's, not overwritten yet
            return int(text)
        if time.monotonic() >= deadline:
            return 0
        time.sleep(0.01)


def lock_home(env: Mapping[str, str] | None = None) -> HomeLock:
    """Take ``$ORION_HOME/server.lock`` for this process's life (exclusive, without waiting), and
    write this pid in it. Raises :class:`HomeLocked` when another process holds it, and an
    :class:`~orion_cli.errors.OrionError` when the path is not a regular file of this user's.
    Without ``fcntl`` (Windows) nothing is locked."""
    from ..errors import OrionError

    path = lock_file(env)
    try:
        import fcntl
    except ImportError:
        return HomeLock(None, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hint = "remove it (orion serve makes a regular file there), then start again"
    try:
        fd = os.open(path, _open_flags(os.O_RDWR, os.O_CREAT), 0o600)
    except OSError as exc:
        what = "a symbolic link" if exc.errno == errno.ELOOP else f"not usable ({exc.strerror or exc})"
        raise OrionError(f"{path} is {what}", hint=hint) from exc
    try:
        problem = _trust_problem(os.fstat(fd))
        if problem is not None:
            raise OrionError(f"{path} is {problem}: not orion's lock file", hint=hint)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HomeLocked(_lock_holder(path)) from None
        except OSError as exc:  # a file system without flock (some network mounts)
            raise OrionError(f"cannot lock {path}: {exc.strerror or exc}",
                             hint="put ORION_HOME on a local file system") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return HomeLock(fd, path)
