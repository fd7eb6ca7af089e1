"""Ollama's API on `orion serve`, driven by the real `ollama` client against a real server: list,
show, chat streamed and not, generate (raw, system, an empty prompt loading the model), embed and
the older embeddings, ps, options refused by name, NDJSON on the wire, pull through the test Hub,
delete; and orion's own routes under /api/orion."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from test_serve import Server, served

ollama = pytest.importorskip("ollama")

MODEL = "gemma3-270m"
PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "ollama-home")


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_list_and_show(client, gemma_q4):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {MODEL, "minilm"}
    gemma = models[MODEL]
    assert gemma.size == gemma_q4.stat().st_size and len(gemma.digest) == 64 and int(gemma.digest, 16) >= 0
    assert gemma.details.format == "gguf" and gemma.details.family == "gemma3"
    assert gemma.details.quantization_level == "Q4_K_M" and gemma.details.parameter_size.endswith("M")
    assert gemma.modified_at is not None

    shown = client.show(MODEL)
    assert shown.details.family == "gemma3" and shown.capabilities == ["completion"]
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] > 0 and shown.modelinfo["general.parameter_count"] > 1e8
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary: counted, not sent
    assert shown.template == ""  # this GGUF has no chat template
    assert client.show(f"{MODEL}:latest").details.family == "gemma3"  # Ollama's default tag
    assert client.show("minilm").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model")
    assert err.value.status_code == 404 and "no-such-model" in err.value.error


def test_chat_whole_and_streamed(client):
    messages = [{"role": "user", "content": PROMPT}]
    options = {"temperature": 0, "num_predict": 8}
    done = client.chat(model=MODEL, messages=messages, options=options, stream=False)
    assert done.done and done.message.role == "assistant" and "Berlin" in done.message.content
    assert done.done_reason in ("stop", "length") and done.eval_count >= 1 and done.prompt_eval_count > 5
    assert done.total_duration >= done.eval_duration > 0 and done.load_duration >= 0

    parts = list(client.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert len([p for p in parts if p.message.content]) >= 3
    assert "".join(p.message.content for p in parts) == done.message.content  # temperature 0: the same answer
    assert parts[-1].eval_count == done.eval_count and parts[-1].done_reason == done.done_reason


def test_the_stream_is_ndjson_on_the_wire(server):
    status, headers, payload = server.request("POST", "/api/generate", {
        "model": MODEL, "prompt": "One, two, three,", "raw": True, "options": {"num_predict": 4, "temperature": 0}})
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in payload.decode().splitlines()]
    assert lines[-1]["done"] is True and all(x["done"] is False for x in lines[:-1])
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(lines[-1][key], int), key
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 4


def test_generate_raw_system_and_an_empty_prompt(client):
    raw = client.generate(model=MODEL, prompt="Monday, Tuesday, Wednesday,", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    assert raw.done and "Thursday" in raw.response and raw.done_reason == "length" and raw.eval_count == 4
    pieces = list(client.generate(model=MODEL, prompt="Monday, Tuesday, Wednesday,", raw=True,
                                  options={"temperature": 0, "num_predict": 4}, stream=True))
    assert "".join(p.response for p in pieces) == raw.response

    with_system = client.generate(model=MODEL, prompt="Wednesday,", system="Monday, Tuesday,",
                                  options={"temperature": 0, "num_predict": 4})
    plain = client.generate(model=MODEL, prompt="Wednesday,", options={"temperature": 0, "num_predict": 4})
    assert with_system.prompt_eval_count > plain.prompt_eval_count  # the system text is part of the prompt

    loaded = client.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert MODEL in [m.model for m in client.ps().models]

    seeded = [client.generate(model=MODEL, prompt="Once upon a time", raw=True,
                              options={"seed": 7, "temperature": 1.0, "top_p": 0.9, "num_predict": 12}).response
              for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0]
    stopped = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True,
                              options={"temperature": 0, "num_predict": 16, "stop": ["6"]})
    assert "6" not in stopped.response and stopped.done_reason == "stop"


def test_embed_and_embeddings(client):
    one = client.embed(model="minilm", input="a cat sat on the mat")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 384 and one.prompt_eval_count > 3
    many = client.embed(model="minilm", input=["a cat sat on the mat", "stock markets fell"])
    assert len(many.embeddings) == 2 and many.embeddings[0] == pytest.approx(one.embeddings[0], abs=1e-5)
    legacy = client.embeddings(model="minilm", prompt="a cat sat on the mat")
    assert legacy.embedding == pytest.approx(one.embeddings[0], abs=1e-5)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="minilm", input="x " * 2000, truncate=False)
    assert err.value.status_code == 400 and "truncate" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="minilm", input="x", dimensions=12)
    assert err.value.status_code == 400 and "384" in err.value.error


def test_ps_in_ollamas_shape(client, server):
    client.generate(model=MODEL, prompt="")
    client.embed(model="minilm", input="warm")
    rows = {m.model: m for m in client.ps().models}
    assert set(rows) == {MODEL, "minilm"}
    gemma = rows[MODEL]
    assert gemma.size > 100e6 and gemma.size_vram is not None and len(gemma.digest) == 64
    assert gemma.details.family == "gemma3" and gemma.context_length == 2048
    orions = {m["name"]: m for m in server.json("GET", "/api/orion/ps")["models"]}
    if orions[MODEL]["keep_alive_s"] is None:  # the server's keep-alive: never, Ollama's ~292 years from now
        assert gemma.expires_at.year > 2200
    else:
        assert 0 <= (gemma.expires_at.timestamp() - time.time()) <= orions[MODEL]["keep_alive_s"] + 5
    # orion's own view is under /api/orion, in its own shape
    assert {m["name"] for m in server.json("GET", "/api/orion/ps")["models"]} == {MODEL, "minilm"}


def test_keep_alive(client, server):
    client.generate(model=MODEL, prompt="", keep_alive=-1)  # never unloaded for inactivity
    assert [m for m in client.ps().models if m.model == MODEL][0].expires_at.year > 2200
    client.generate(model=MODEL, prompt="", keep_alive="10m")
    left = [m for m in client.ps().models if m.model == MODEL][0].expires_at.timestamp() - time.time()
    assert 590 <= left <= 600
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and MODEL not in [m.model for m in client.ps().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL, prompt="", keep_alive="soon")
    assert err.value.status_code == 400 and "soon" in err.value.error


@pytest.mark.parametrize("call, named", [
    (lambda c: c.generate(model=MODEL, prompt="hi", options={"top_k": 40}), "top_k"),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=False,
                      options={"mirostat": 1, "repeat_penalty": 1.1}), "mirostat"),
    (lambda c: c.generate(model=MODEL, prompt="hi", options={"num_ctx": 4096}), "num_ctx"),
    (lambda c: c.generate(model=MODEL, prompt="hi", template="{{ .Prompt }}"), "template"),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=False,
                      tools=[{"type": "function", "function": {"name": "f", "description": "d",
                                                               "parameters": {"type": "object", "properties": {}}}}]),
     "tools"),
    (lambda c: c.embed(model="minilm", input="x", options={"temperature": 0.5}), "temperature"),
    (lambda c: c.generate(model=MODEL, prompt="hi", options={"temperature": 5}), "temperature"),
])
def test_an_option_orion_cannot_honour_is_refused_by_name(client, call, named):
    with pytest.raises(ollama.ResponseError) as err:
        call(client)
    assert err.value.status_code == 400 and named in err.value.error


def test_format_json_and_a_schema_hold_the_answer(client, server):
    """Ollama's structured outputs: ``format: "json"`` (any JSON object) and ``format: SCHEMA``, as
    llama.cpp grammars; an answer the grammar ended parses (and validates)."""
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    answer = client.chat(model=MODEL, messages=[{"role": "user", "content": "The weather in Paris, as JSON."}],
                         format=schema, stream=False, options={"temperature": 0, "num_predict": 80})
    assert answer.done_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)
    loose = client.generate(model=MODEL, prompt="A JSON object about the sea:", format="json",
                            options={"temperature": 0, "num_predict": 60})
    assert loose.response.startswith("{")
    if loose.done_reason == "stop":
        assert isinstance(json.loads(loose.response), dict)
    with pytest.raises(ollama.ResponseError) as err:  # a keyword the grammar would not enforce
        client.generate(model=MODEL, prompt="hi", format={"type": "object", "properties": {
            "n": {"type": "integer", "minimum": 0}}})
    assert err.value.status_code == 400 and "'minimum'" in err.value.error
    status, _, body = server.request("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "format": "xml"})
    assert status == 400 and "'format'" in json.loads(body)["error"]  # the client checks it; curl does not


def test_a_client_that_leaves_a_stream_gives_the_model_back(server):
    """A streamed chat left after its first line: the worker stops at its next token and the model
    is in use no more (polled with a deadline), and the next request is answered."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.info["port"], timeout=60)
    conn.request("POST", "/api/generate", body=json.dumps({
        "model": MODEL, "prompt": "Count from one to a thousand:", "raw": True, "options": {"num_predict": 1500}}))
    response = conn.getresponse()
    first = json.loads(response.readline())
    assert first["done"] is False
    conn.sock.shutdown(2)  # gone, in the middle
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        models = {m["name"]: m for m in server.json("GET", "/api/orion/ps")["models"]}
        if not models[MODEL]["in_use"] and not models[MODEL]["queue_depth"]:
            break
        assert time.monotonic() < deadline, models[MODEL]
        time.sleep(0.05)  # polling a state the server changes, with a deadline
    after = ollama.Client(host=server.url).generate(model=MODEL, prompt="One, two,", raw=True,
                                                    options={"num_predict": 2, "temperature": 0})
    assert after.done and after.eval_count == 2


def test_errors_are_ollamas_shape(server):
    status, _, payload = server.request("POST", "/api/chat", {"model": "nope", "messages": []})
    assert status == 404 and isinstance(json.loads(payload)["error"], str)
    status, _, payload = server.request("GET", "/api/nothing-here")
    assert status == 404 and "/api/orion" in json.loads(payload)["error"]
    status, _, payload = server.request("GET", "/v1/nothing-here")  # the OpenAI side keeps its shape
    assert status == 404 and json.loads(payload)["error"]["code"] == "not_found"
    status, _, payload = server.request("POST", "/api/pull", {"model": "hf.co/org/repo:Q4_K_M"})
    assert status == 403 and "--allow-fetch" in json.loads(payload)["error"]  # a strict server downloads nothing
    status, _, payload = server.request("DELETE", "/api/delete", {"model": MODEL})
    assert status == 403 and "--allow-fetch" in json.loads(payload)["error"]


@pytest.mark.parametrize("method, path, body, status, named", [
    ("POST", "/api/chat", b"{not json", 400, "JSON"),
    ("POST", "/api/chat", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     400, "images"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "user"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [], "stream": "false"}, 400, "stream"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": ["a"]}, 400, "prompt"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "a", "raw": True, "system": "s"}, 400, "system"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "a", "context": [1, 2]}, 400, "context"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "a", "options": [1]}, 400, "options"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "a", "options": {"num_predict": 0}}, 400, "num_predict"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "a", "options": {"stop": [""]}}, 400, "stop"),
    ("POST", "/api/generate", {"prompt": "a"}, 400, "model"),
    ("POST", "/api/generate", {"model": "minilm", "prompt": "a"}, 400, "encoder"),
    ("POST", "/api/embed", {"model": "minilm", "input": [1, 2]}, 400, "input"),
    ("POST", "/api/embed", {"model": "minilm"}, 400, "input"),
    ("POST", "/api/embeddings", {"model": "minilm", "prompt": ["a"]}, 400, "prompt"),
    ("POST", "/api/embed", {"model": MODEL, "input": "a"}, 400, "embed"),
    ("POST", "/api/show", {}, 400, "model"),
    ("POST", "/api/pull", {"model": "hf.co/org/repo:Q9_Z"}, 400, "Q9_Z"),
    ("POST", "/api/delete", {"model": MODEL}, 405, "DELETE"),
])
def test_a_bad_ollama_request_is_one_clear_error(server, method, path, body, status, named):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, payload = server.request(method, path, raw=raw)
    assert got == status, payload
    assert headers["content-type"].startswith("application/json")
    error = json.loads(payload)["error"]
    text = error if isinstance(error, str) else error["message"]  # a 405 is answered before any route
    assert named.lower() in text.lower() and "Traceback" not in text and "\n" not in text, text


def test_the_api_key_guards_ollamas_routes(tmp_path_factory, gemma_q4, engine_check_cache):
    home = tmp_path_factory.mktemp("ollama-key")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, "--api-key", "s3cret")
    try:
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=s.url).list()
        assert err.value.status_code == 401
        assert ollama.Client(host=s.url, headers={"Authorization": "Bearer s3cret"}).list().models == []
    finally:
        assert s.stop() == 0


def test_version(server):
    status, _, payload = server.request("GET", "/api/version")
    assert status == 200 and json.loads(payload)["version"] == server.json("GET", "/health")["version"]


def test_pull_through_the_hub_then_use_and_delete(hub, tmp_path, engine_check_cache):
    from conftest import LADDER_REPO

    home = tmp_path / "pull-home"
    home.mkdir()
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, "--allow-fetch", env={"ORION_CTX": "2048"})
    try:
        client = ollama.Client(host=s.url)
        name = f"hf.co/{LADDER_REPO}:Q8_0"
        lines = list(client.pull(name, stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        progress = [x for x in lines if x.total]
        assert progress and progress[-1].completed == progress[-1].total  # the whole file came
        listed = {m.model: m for m in client.list().models}
        assert len(listed) == 1 and next(iter(listed.values())).details.quantization_level == "Q8_0"
        assert client.pull(name, stream=False).status == "success"  # here already: nothing fetched again
        again = list(client.pull(next(iter(listed)), stream=True))  # by the name it is registered under
        assert again[-1].status == "success" and not [x for x in again if x.total]

        answer = client.generate(model=name, prompt="Monday, Tuesday, Wednesday,", raw=True,
                                 options={"temperature": 0, "num_predict": 4})
        assert "Thursday" in answer.response
        assert client.delete(name).status == "success"
        assert client.list().models == [] and client.ps().models == []
        with pytest.raises(ollama.ResponseError) as err:
            client.delete(name)
        assert err.value.status_code == 404
    finally:
        assert s.stop() == 0


def test_options_as_orion_takes_them():
    from orion_cli.server import ollama as wire
    from orion_cli.server.http_errors import APIError

    assert wire.generation_options({}, 2048) == ({"max_tokens": 2048, "temperature": 0.8, "top_p": 0.9,
                                                  "seed": None}, [])
    options, stops = wire.generation_options({"options": {"num_predict": -1, "seed": -1, "num_ctx": 2048,
                                                          "temperature": 0, "top_p": 1, "stop": "\n",
                                                          "top_k": None}}, 2048)
    assert options == {"max_tokens": 2048, "temperature": 0.0, "top_p": 1.0, "seed": None} and stops == ["\n"]
    assert wire.generation_options({"options": {"num_predict": 5, "seed": 3}}, 2048)[0]["max_tokens"] == 5
    for bad in ({"num_predict": 4096}, {"num_ctx": 4096}, {"top_k": 40}, {"seed": 1.5}, {"top_p": 2}):
        with pytest.raises(APIError) as err:
            wire.generation_options({"options": bad}, 2048)
        assert err.value.status == 400 and next(iter(bad)) in err.value.message
    assert wire.orion_name("hf.co/org/repo:Q8_0", {}) == "org/repo"
    assert wire.model_name({"model": "gemma3-270m:latest"}) == "gemma3-270m"
