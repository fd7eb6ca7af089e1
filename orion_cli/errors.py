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
6     network or Hub error
7     the model file is not a valid GGUF
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


class Interrupted(OrionError):
    """Ctrl-C during work that keeps what it had (a download resumes)."""

    exit_code = EXIT_INTERRUPTED


def internal_error_line(exc: BaseException) -> str:
    """The line shown for an exception orion did not expect (a bug)."""
    return (
        f"internal error: {type(exc).__name__}: {exc}: "
        "run again with --debug for the traceback and report it"
    )
