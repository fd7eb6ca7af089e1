"""Every OpenAI parameter of /v1/chat/completions and /v1/completions is honoured or refused with a
400 that names it (issue 22: no silent ignoring), driven by the real ``openai`` client and
langchain-openai against a real ``orion serve`` (gemma3-270m, no chat template; its models in runner
processes, the default), started once for the module."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import openai
import pytest

from orion_cli.server import openai as wire
from tests.test_serve import served

MODEL = "gemma3-270m"
HI = [{"role": "user", "content": "Count: one, two, three,"}]
PROMPT = "One, two, three,"
GREEDY = {"temperature": 0, "seed": 7}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "openai-parameters.md"


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "params-home")


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=300)


def refused(call, param: str, code: str | None = None) -> str:
    """The 400 ``call()`` gets: it names ``param``; its message."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    err = caught.value
    assert err.status_code == 400
    body = err.body if isinstance(err.body, dict) else {}
    assert body.get("param") == param, err.body
    if code is not None:
        assert body.get("code") == code, err.body
    assert param in body["message"], body["message"]
    return body["message"]


# ---------------------------------------------------------------- refused, each named

CHAT_REFUSED = [
    ("n", {"n": 2}),
    ("functions", {"functions": [{"name": "f", "parameters": {"type": "object"}}]}),
    ("function_call", {"function_call": "auto"}),
    ("logit_bias", {"logit_bias": {"100": 5}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
    ("verbosity", {"verbosity": "low"}),
    ("web_search_options", {"web_search_options": {}}),
]


@pytest.mark.parametrize("param,kwargs", CHAT_REFUSED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CHAT_REFUSED)])
def test_chat_refuses_what_it_does_not_do(client, param, kwargs):
    message = refused(lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, **kwargs),
                      param, "unsupported_parameter")
    assert "orion serve" in message


def test_refusals_say_what_to_do(client):
    message = refused(lambda: client.chat.completions.create(model=MODEL, messages=HI, functions=[
        {"name": "f", "parameters": {"type": "object"}}]), "functions")
    assert message.startswith("'functions' is not supported yet by orion serve") and "leave it out" in message


COMPLETION_REFUSED = [
    ("n", {"n": 3}),
    ("best_of", {"best_of": 2}),
    ("echo", {"echo": True}),
    ("suffix", {"suffix": " and the end."}),
    ("logit_bias", {"logit_bias": {"100": -100}}),
]


@pytest.mark.parametrize("param,kwargs", COMPLETION_REFUSED, ids=[p for p, _ in COMPLETION_REFUSED])
def test_completions_refuse_what_they_do_not_do(client, param, kwargs):
    refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **kwargs), param,
            "unsupported_parameter")


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize("key", ["foo", "top_k", "min_p", "repeat_penalty"])
def test_an_unknown_key_is_refused_by_name(client, route, key):
    if route == "chat":
        call = lambda: client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2,  # noqa: E731
                                                      extra_body={key: 1})
    else:
        call = lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,  # noqa: E731
                                                 extra_body={key: 1})
    message = refused(call, key, "unknown_parameter")
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    assert message == f"unknown parameter '{key}' for {path}"


def test_a_key_of_the_other_route_says_so(server):
    status, _, payload = server.request("POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT,
                                                                     "max_tokens": 2, "top_logprobs": 2})
    error = json.loads(payload)["error"]
    assert status == 400 and error["param"] == "top_logprobs" and "/v1/chat/completions" in error["hint"]


@pytest.mark.parametrize("param,kwargs", [
    ("frequency_penalty", {"frequency_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": "1"}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"top_logprobs": 2}),  # without logprobs: true
    ("logprobs", {"logprobs": 1}),  # chat's is a boolean
    ("max_completion_tokens", {"max_completion_tokens": 0}),
    ("max_completion_tokens", {"max_completion_tokens": 5, "max_tokens": 6}),
])
def test_chat_values_out_of_range(client, param, kwargs):
    refused(lambda: client.chat.completions.create(model=MODEL, messages=HI, **kwargs), param, "invalid_value")


@pytest.mark.parametrize("param,kwargs", [
    ("logprobs", {"logprobs": 6}),
    ("logprobs", {"logprobs": True}),
    ("presence_penalty", {"presence_penalty": 3}),
])
def test_completion_values_out_of_range(client, param, kwargs):
    refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, **kwargs), param, "invalid_value")


def test_every_parameter_of_the_openai_client_is_placed_and_documented():
    """A parameter the installed ``openai`` client can send is honoured, harmless or refused here (a
    new one fails this test, not silently), and docs/openai-parameters.md has a row for each."""
    oc = openai.OpenAI(api_key="none", base_url="http://127.0.0.1:9/v1")
    docs = DOCS.read_text()
    transport = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    for create, placed in (
            (oc.chat.completions.create, wire.HONOURED_CHAT | wire.HARMLESS_CHAT | set(wire.REFUSED_CHAT)),
            (oc.completions.create, wire.HONOURED_COMPLETIONS | wire.HARMLESS_COMPLETIONS
             | set(wire.REFUSED_COMPLETIONS))):
        params = set(inspect.signature(create).parameters) - transport
        assert params - placed == set(), create
        for name in placed:
            assert f"| `{name}` |" in docs, name


# ---------------------------------------------------------------- accepted as harmless: the same text


def test_harmless_fields_are_accepted_and_change_nothing(client):
    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, **GREEDY)
    extra = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=12, **GREEDY, user="u-1", store=False, metadata={"team": "a"},
        service_tier="auto", prompt_cache_key="k", safety_identifier="s", n=1, parallel_tool_calls=True,
        tools=[], response_format={"type": "text"}, modalities=["text"], logit_bias={}, logprobs=False)
    assert extra.choices[0].message.content == plain.choices[0].message.content
    assert plain.choices[0].message.content
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    same = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY, user="u-1", n=1,
                                     best_of=1, echo=False, suffix="", logit_bias={})
    assert same.choices[0].text == text.choices[0].text


# ---------------------------------------------------------------- max_completion_tokens


def test_max_completion_tokens_is_max_tokens(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=3, **GREEDY)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens <= 3
    both = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=3, max_tokens=3, **GREEDY)
    old = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, **GREEDY)
    assert both.choices[0].message.content == old.choices[0].message.content == out.choices[0].message.content
    longer = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=20, **GREEDY)
    assert longer.usage.completion_tokens > 3


def test_langchain_max_tokens_stops_at_8(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model=MODEL, max_tokens=8, temperature=0,
                     max_retries=0)
    answer = llm.invoke("Write a long story about a dragon who learns to read.")
    assert answer.content
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata["output_tokens"] <= 8


# ---------------------------------------------------------------- penalties


def test_frequency_penalty_changes_greedy_text(client):
    def text(**kwargs):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, **GREEDY, **kwargs).choices[0].text

    plain = text()
    assert text(frequency_penalty=0) == plain == text(presence_penalty=0.0)
    penalised = text(frequency_penalty=2)
    assert penalised != plain
    assert text(frequency_penalty=2) == penalised  # greedy: the same again
    assert text(presence_penalty=2) != plain
    # the penalised text repeats its commas less than the plain list does
    assert penalised.count(",") < plain.count(",")


def test_penalties_in_chat(client):
    def text(**kwargs):
        out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, **GREEDY, **kwargs)
        return out.choices[0].message.content

    assert text(frequency_penalty=0) == text()
    assert text(frequency_penalty=2, presence_penalty=1) != text()


# ---------------------------------------------------------------- logprobs


def check_entry(entry, k: int) -> None:
    assert entry.logprob <= 0 and math.isfinite(entry.logprob)
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    tops = [t.logprob for t in entry.top_logprobs]
    assert len(tops) == k and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
    assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
    if k:  # greedy: the token drawn is the likeliest
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, logprobs=True, top_logprobs=3,
                                         **GREEDY)
    text = out.choices[0].message.content
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 10
    assert b"".join(bytes(e.bytes) for e in content).decode() == text
    assert "".join(e.token for e in content) == text
    for entry in content:
        check_entry(entry, 3)
    none = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in none.choices[0].logprobs.content)
    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10, **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


def test_chat_logprobs_streamed_are_the_whole_answers(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=10, logprobs=True, top_logprobs=2, **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0]
    text, entries = "", []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                entries += chunk.choices[0].logprobs.content
    assert text == whole.message.content
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in whole.logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole.logprobs.content], abs=1e-4)


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=2, **GREEDY)
    choice = choice_lp = out.choices[0]
    lp = choice_lp.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 8
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset[0] == len(PROMPT)  # OpenAI's offsets: into the prompt followed by the text
    assert lp.text_offset == [len(PROMPT) + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == pytest.approx(value)  # the sampled token's, always
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value)  # greedy: the likeliest
    streamed = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=2,
                                                                 stream=True, **GREEDY) if c.choices]
    tokens = [t for c in streamed if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in streamed if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert "".join(c.text for c in streamed) == choice.text


def test_logprobs_with_a_stop_string_cover_the_text(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, logprobs=0, stop=[" six"], **GREEDY)
    text = out.choices[0].text
    assert text and " six" not in text
    assert "".join(out.choices[0].logprobs.tokens) == text  # the stop string's tokens are not listed


# ---------------------------------------------------------------- the clients' plain calls


def first_text(stream, text) -> str:
    """The first non-empty text of a stream, which is then closed (the rest is not waited for)."""
    try:
        return next(t for t in map(text, stream) if t)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def test_the_openai_clients_plain_calls(client):
    """Each call as a user writes it first, nothing but the model and the input: the bodies the
    client sends by default are served (a stream is closed after its first text: the point is that
    the request was taken)."""
    chat = client.chat.completions.create(model=MODEL, messages=HI)
    assert chat.choices[0].message.content and chat.usage.completion_tokens >= 1
    assert first_text(client.completions.create(model=MODEL, prompt=PROMPT, stream=True),
                      lambda c: c.choices[0].text if c.choices else "")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_langchains_plain_calls(server):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model=MODEL, max_retries=0)
    assert chat.invoke("Say hello.").content
    assert first_text(chat.stream("Say hello."), lambda c: c.content)
    plain = OpenAI(base_url=f"{server.url}/v1", api_key="none", model=MODEL, max_retries=0, max_tokens=8)
    assert plain.invoke(PROMPT)


def test_logprobs_and_penalties_in_process_are_the_runners(client, gemma_q4):
    """The server's models run in runner processes (a token's record crosses the connection with its
    bytes); the same generation in this process, through the decoder itself, gives the same tokens
    and log-probabilities, penalised alike."""
    from orion_cli.engine import LoadSpec, load
    from orion_cli.generation import Generation

    options = {"max_tokens": 10, "temperature": 0, "top_p": 1.0, "seed": 7, "frequency_penalty": 1.5,
               "presence_penalty": 0.5, "logprobs": 2}
    # cache_prompt false: the exact mode (the server's cells kept from earlier requests change the
    # attention's summation order, and so the last digits of a log-probability)
    served = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=2, temperature=0, seed=7,
                                       frequency_penalty=1.5, presence_penalty=0.5,
                                       extra_body={"cache_prompt": False}).choices[0]
    model = load(LoadSpec(gemma_q4, 2048, 2))
    try:
        gen = Generation(model, PROMPT, options, chat=False)
        assert gen.run() == served.text
        records = gen.new_records()
    finally:
        model.close()
    assert [raw.decode("utf-8", "replace") for raw, _, _ in records] == served.logprobs.tokens
    assert [lp for _, lp, _ in records] == pytest.approx(served.logprobs.token_logprobs, abs=1e-3)
    assert all(len(top) == 2 for _, _, top in records)
