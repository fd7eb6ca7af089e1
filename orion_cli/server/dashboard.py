"""The dashboard's files (``orion_cli/server/static``, shipped in the package): a page, a hand-written
script and a style sheet, nothing fetched from elsewhere, so it works offline.

They are served without the API key (they hold no data: the page asks for the key and sends it as a
Bearer header on its API calls), each with a strict Content-Security-Policy: scripts, styles and
connections from this server only, no inline script or style, no frames, no forms posted elsewhere.
"""

from __future__ import annotations

import threading
from importlib.resources import files

# the files a client may ask for, and their types: any other name is a 404 (no path is ever joined)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGE = "index.html"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

_cache: dict[str, bytes] = {}
_lock = threading.Lock()


def static_file(name: str) -> bytes | None:
    """A dashboard file's bytes, read once from the installed package (None: not one of :data:`FILES`)."""
    if name not in FILES:
        return None
    with _lock:
        if name not in _cache:
            _cache[name] = files("orion_cli.server").joinpath("static", name).read_bytes()
        return _cache[name]
