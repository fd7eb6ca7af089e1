"""llama.cpp's own log: silent unless ``--debug`` (orion reports failures in its own words)."""

from __future__ import annotations

_NULL_LOG = None


def silence_mtmd() -> None:
    """The vision library (mtmd) logs every image it encodes to stderr; quiet unless --debug."""
    import llama_cpp.mtmd_cpp as M

    route_llama_log(False)
    M.mtmd_log_set(_NULL_LOG, None)
    M.mtmd_helper_log_set(_NULL_LOG, None)


def route_llama_log(verbose: bool) -> None:
    """llama.cpp's log: llama-cpp-python's printer with --debug, else nothing. (0.3.36's printer maps
    ggml's levels one off: every warning reaches stderr even with verbose=False, and its errors
    never do; orion reports failures in its own words.)"""
    global _NULL_LOG
    import llama_cpp.llama_cpp as C

    if verbose:
        from ._binding import llama_cpp_log_printer

        C.llama_log_set(llama_cpp_log_printer(), None)
        return
    if _NULL_LOG is None:
        _NULL_LOG = C.llama_log_callback(lambda level, text, user_data: None)  # kept alive: C holds it
    C.llama_log_set(_NULL_LOG, None)


_CAPTURE = None


def capture_llama_log(lines: list[str]) -> None:
    """llama.cpp's log appended to ``lines`` (a dry run reads its figures there)."""
    global _CAPTURE
    import llama_cpp.llama_cpp as C

    def on_log(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    _CAPTURE = C.llama_log_callback(on_log)  # kept alive: C holds it
    C.llama_log_set(_CAPTURE, None)
