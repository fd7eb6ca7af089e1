"""Tool calls through `orion serve` with the real openai client and LangChain's ``bind_tools``, against a
server the test starts: the answer held by a grammar to calls whose arguments validate against each
tool's parameters (gemma3-270m: a small model's choices, a grammar's guarantees), and a round trip
with an assistant's ``tool_calls`` and ``role: "tool"`` results."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_serve import served

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "tools-home")


def _calls(choice) -> list:
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    return choice.message.tool_calls


def test_required_calls_validate_against_the_tools_parameters(server):
    """One call (parallel_tool_calls false) always ends; several may run to max_tokens with a small
    model at temperature 0 (it keeps adding calls), which is then an unfinished answer, as OpenAI's."""
    client = server.client()
    for parallel in (False, True):
        reply = client.chat.completions.create(model="gemma3-270m", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", parallel_tool_calls=parallel,
                                               max_tokens=160, temperature=0)
        choice = reply.choices[0]
        if parallel and choice.finish_reason == "length":
            assert choice.message.content.startswith('{"tool_calls"') and not choice.message.tool_calls
            continue
        calls = _calls(choice)
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_named_choice_calls_that_tool_and_a_stream_gives_the_call(server):
    client = server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    calls = _calls(client.chat.completions.create(model="gemma3-270m", messages=ASK, tools=[WEATHER, TIME],
                                                  tool_choice=named, parallel_tool_calls=False, max_tokens=120,
                                                  temperature=0).choices[0])
    assert {c.function.name for c in calls} == {"get_time"}
    chunks = list(client.chat.completions.create(model="gemma3-270m", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=named, parallel_tool_calls=False, max_tokens=120,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and deltas and deltas[0][0].function.name == "get_time"
    json.loads(deltas[0][0].function.arguments)


def test_a_round_trip_with_the_tools_result_reaches_the_model(server):
    client = server.client()
    first = client.chat.completions.create(model="gemma3-270m", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                           temperature=0)
    call = _calls(first.choices[0])[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    again = client.chat.completions.create(model="gemma3-270m", messages=history, tools=[WEATHER], max_tokens=120,
                                           temperature=0)
    message = again.choices[0].message
    assert message.content is not None or message.tool_calls  # a reply or another call, as "auto" allows
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result were in it


def test_bad_tool_requests_are_400s_that_name_the_field(server):
    client = server.client()
    cases = [
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
        (dict(tools=[WEATHER], response_format={"type": "json_object"}), "response_format"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]), None),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="gemma3-270m", messages=ASK, max_tokens=8, **kwargs)
        if param is not None:
            assert bad.value.body["param"] == param, bad.value.body
        else:  # a keyword the grammar would not enforce, in a tool's parameters
            assert "'minimum'" in bad.value.body["message"]


def test_langchain_bind_tools_returns_a_call(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "sunny"

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="gemma3-270m", temperature=0, max_retries=0,
                     max_tokens=120)
    message = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)
