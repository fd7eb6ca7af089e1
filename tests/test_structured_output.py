"""Structured outputs through `orion serve`: ``response_format`` json_object and json_schema made
llama.cpp grammars, driven by the real openai client and LangChain's ``with_structured_output``
against a server the test starts (gemma3-270m: its text is a small model's, its JSON always parses)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_serve import served

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
     "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["n", "ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"who": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": False}}, "required": ["who"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number"}, "unit": {"const": "cm"}},
     "required": ["x", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
     "required": ["answer"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    yield from served(tmp_path_factory, gemma_q4, engine_check_cache, "structured-home")


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_json_schema_output_parses_and_validates(server, schema):
    reply = server.client().chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Answer in JSON about Paris."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        max_tokens=160, temperature=0.7, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_its_stream(server):
    """Any JSON object: an answer the grammar ended parses; one cut by max_tokens is the start of one
    (as OpenAI's are). The stream gives the same text."""
    client = server.client()
    messages = [{"role": "user", "content": "Describe the moon as a JSON object."}]
    ask = dict(model="gemma3-270m", messages=messages, max_tokens=120, temperature=0.8,
               response_format={"type": "json_object"})
    finished = []
    for seed in (1, 2, 3, 4):
        whole = client.chat.completions.create(**ask, seed=seed).choices[0]
        assert whole.message.content.startswith("{")
        if whole.finish_reason == "stop":
            finished.append(json.loads(whole.message.content))
    assert finished and all(isinstance(doc, dict) for doc in finished)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, seed=4, stream=True)
              if c.choices]
    assert "".join(pieces) == whole.message.content
    plain = client.chat.completions.create(**ask | {"response_format": {"type": "text"}}, seed=4)
    assert plain.choices[0].message.content != whole.message.content  # the grammar is what changed it


def test_a_schema_llama_cpp_cannot_follow_and_a_malformed_format_are_400s(server):
    client = server.client()
    ask = dict(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**ask, response_format={"type": "xml"})
    assert bad.value.body["param"] == "response_format"
    for stream in (False, True):  # refused before a stream's first byte as well
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**ask, stream=stream, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                    "a": {"$ref": "#/definitions/missing"}}}}})
        assert "response_format.json_schema.schema" in bad.value.body["message"]
    # a keyword the grammar would not enforce is refused by name, not followed in part
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**ask, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}}})
    assert "schema.properties.age has 'minimum'" in bad.value.body["message"]


def test_langchain_with_structured_output_returns_a_validated_object(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        population_millions: int

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="gemma3-270m", temperature=0, max_retries=0,
                     max_tokens=120)
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a big city and its population.")
    assert isinstance(city, City) and city.name
