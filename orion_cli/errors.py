"""Every error orion reports to a user, and the exit code it ends with.

Library code raises these typed exceptions; only the CLI's top level turns
them into one line (what is wrong, then the next step) and an exit code.
``--debug`` shows the traceback as well.

Exit codes:

====  ==========================================================
0     success
1     an error that has no more specific code below
2     bad command-line usage (unknown option, missing argument, bad value)
3     configuration: the strategy file or an ORION_* variable is wrong
4     not found: a model, file or repository that does not exist
5     does not fit: not enough memory or disk for what was asked
6     network or Hub error (an RPC server unreachable, busy, or gone mid-run included)
7     the model file is not a valid GGUF
8     llama.cpp crashed (a native fault in a child process: SIGSEGV, SIGABRT...)
70    internal error (a bug in orion: please report it with --debug)
130   interrupted (Ctrl-C)
====  ==========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_NOT_FOUND = 4
EXIT_DOES_NOT_FIT = 5
EXIT_NETWORK = 6
EXIT_BAD_MODEL = 7
EXIT_ENGINE_CRASH = 8
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class OrionError(Exception):
    """Base of every error orion explains to the user."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the next step, on one line."""
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message


class InvalidValue(OrionError):
    """A value given on the command line is not valid (a size, a tier, a number)."""

    exit_code = EXIT_USAGE


class ConfigError(OrionError):
    """The strategy file or an ORION_* environment variable is wrong."""

    exit_code = EXIT_CONFIG


class NotFound(OrionError):
    exit_code = EXIT_NOT_FOUND


class DoesNotFit(OrionError):
    exit_code = EXIT_DOES_NOT_FIT


class NetworkError(OrionError):
    exit_code = EXIT_NETWORK


class NotAGGUF(OrionError):
    exit_code = EXIT_BAD_MODEL


class WrongModelKind(InvalidValue):
    """An encoder asked to write text, or a text model asked for embeddings."""


class ModelInUse(OrionError):
    """A model that requests are using cannot be unloaded now."""


class Interrupted(OrionError):
    """Ctrl-C during work that keeps what it had (a download resumes)."""

    exit_code = EXIT_INTERRUPTED


class EngineFault(OrionError):
    """A child process running llama.cpp died by a signal (not out of memory)."""

    exit_code = EXIT_ENGINE_CRASH


# ---------------------------------------------------------------- across processes and from the OS


def error_payload(exc: OrionError) -> dict:
    """What a child process prints (as JSON) so that its parent raises the same error."""
    return {"error": exc.message, "hint": exc.hint or "", "class": type(exc).__name__}


def error_from_payload(doc: dict) -> OrionError:
    """The error a child reported, as its own class (OrionError for a class this module lacks)."""
    cls = _classes().get(str(doc.get("class", "")), OrionError)
    message, hint = str(doc.get("error") or "the child process failed"), doc.get("hint") or None
    try:
        return cls(message, hint=hint)
    except TypeError:  # a class with a constructor of its own: the base class, same message
        return OrionError(message, hint=hint)


def _classes() -> dict[str, type[OrionError]]:
    found: dict[str, type[OrionError]] = {}
    todo: list[type[OrionError]] = [OrionError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def signal_name(returncode: int) -> str:
    """The signal a child's negative exit status names ("SIGSEGV"; "signal 77" for one Python lacks)."""
    import signal

    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def child_failure(returncode: int, what: str, last_line: str = "") -> OrionError:
    """The error for a child process that ended without reporting one: killed by SIGKILL (the
    kernel's out-of-memory killer, most often), by another signal (a native crash), or an exit code."""
    if returncode < 0:
        name = signal_name(returncode)
        if name == "SIGKILL":
            return DoesNotFit(f"{what} was killed (SIGKILL): the system most likely ran out of memory",
                              hint="free memory, or use a smaller model or --ctx")
        return EngineFault(f"{what} crashed in llama.cpp ({name})",
                           hint="run with --debug to see llama.cpp's log; 'orion profile --recheck-engine' "
                                "checks the engine on this CPU")
    return OrionError(f"{what} failed (exit {returncode})" + (f": {last_line}" if last_line else ""),
                      hint="run with --debug to see llama.cpp's log")


READ_ONLY_HINT = "that file system is mounted read-only: set ORION_HOME (or -o) to a folder on a writable one"


def from_os_error(exc: OSError) -> OrionError:
    """A file-system error as one line a user can act on: a full disk, a permission, a missing file."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == getattr(errno, "EDQUOT", -1):
        return DoesNotFit(f"no space left on the device{where}", hint="free some space, then run again")
    if exc.errno == errno.EROFS:
        return OrionError(f"{reason}{where}", hint=READ_ONLY_HINT)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OrionError(f"{reason}{where}", hint="check the permissions, or set ORION_HOME to a folder you can write")
    if exc.errno == errno.ENOENT:
        return NotFound(f"{reason}{where}", hint="check the path")
    return OrionError(f"{reason}{where}", hint="check the file and the disk, then run again")


def from_sqlite_error(exc: Exception, path=None) -> OrionError:
    """SQLite's errors for the store at ``path`` (a ``Path``; the caller knows which store): a lock held
    by another process, a full disk, a damaged file."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return OrionError("the store is locked by another orion process",
                          hint="wait for it to finish (or stop it), then run again; nothing was written")
    if "full" in text:
        return DoesNotFit("no space left on the device for the store", hint="free some space, then run again")
    path = path if path is not None else "(the embeddings store)"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return OrionError(f"the embeddings store {path} is damaged ({exc})",
                          hint="move it away (orion starts a new one; 'sqlite3 FILE .recover' may save its rows), "
                               "then embed again")
    if "unable to open" in text or "readonly" in text:
        import os

        from pathlib import Path

        folder = Path(path).absolute()
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            return OrionError(f"Read-only file system ({path})", hint=READ_ONLY_HINT)
        return OrionError(f"cannot write the embeddings store {path} ({exc})",
                          hint="check the permissions, or set ORION_HOME to a folder you can write")
    return OrionError(f"the store cannot be used: {exc}", hint="run again with --debug to see why")


def internal_error_line(exc: BaseException) -> str:
    """The line shown for an exception orion did not expect (a bug)."""
    return (
        f"internal error: {type(exc).__name__}: {exc}: "
        "run again with --debug for the traceback and report it"
    )
