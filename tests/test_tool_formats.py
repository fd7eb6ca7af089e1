"""Tool calls in a chat template's own format (orion_cli.tool_formats): a template with tools is
rendered with them and with the conversation's tool turns as they are, the answer is held to calls in
the model's syntax and parsed back into OpenAI's ``tool_calls``; through `orion serve` with the real
openai client.

The models are random-weight llamas written here with ``gguf`` (tests/arch_models.py), each carrying a
template written for this test in the shape of one family's (Hermes/Qwen's ``<tool_call>`` tags,
Mistral's ``[TOOL_CALLS]``, Llama 3's JSON calls): their text is noise, so what is checked is what a
grammar and a template guarantee (the format, the tool's name, arguments that validate), never the
choice a trained model would make.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from arch_models import SMALL, write_model
from test_serve import Server

from orion_cli import tool_formats
from orion_cli.tools import Tool, ToolChoice

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures, within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Answer a call with <tool_call>{"name": NAME, "arguments": ARGS}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

MISTRAL_TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{% if loop.last and tools %}\
[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]\
{% elif m.role == 'assistant' %}{% if m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}\
{% if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}\
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}\
{% if not loop.last %}, {% endif %}{% endfor %}]{% else %}{{ m.content }}{% endif %}{{ eos_token }}\
{% elif m.role == 'tool' %}[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}\
[/TOOL_RESULTS]{% endif %}{% endfor %}"""

LLAMA3_TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}\
<|start_header_id|>ipython<|end_header_id|>

{{ m.content }}<|eot_id|>{% elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}\
{% endfor %}<|eot_id|>{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if loop.last and tools and m.role == 'user' %}Given these functions, answer with a JSON call.

{% for t in tools %}{{ t | tojson }}

{% endfor %}{% endif %}{{ m.content }}<|eot_id|>{% endif %}{% endfor %}\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

TEMPLATES = {"hermes": HERMES_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "llama3": LLAMA3_TEMPLATE}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _choice(*tools: dict, mode: str = "auto", parallel: bool = True) -> ToolChoice:
    return ToolChoice(tuple(Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                            for t in tools), mode, parallel)


# ---------------------------------------------------------------- formats, without a model


def test_each_template_is_read_as_its_format_and_others_get_orions():
    assert {n: tool_formats.detect(t).name for n, t in TEMPLATES.items()} == {n: n for n in TEMPLATES}
    for other in (None, "", "{% for m in messages %}<start_of_turn>{{ m.content }}{% endfor %}",
                  "<|start_header_id|>{{ m.role }}<|end_header_id|>"):  # Llama 3 without ipython: no tools
        assert tool_formats.detect(other) is None


def test_answers_parse_into_openai_calls_and_anything_else_stays_text():
    hermes, mistral, llama3 = (tool_formats.FORMATS[n] for n in ("hermes", "mistral", "llama3"))
    content, calls = hermes.parse('Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
                                  '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                                  '"unit": "celsius"}}\n</tool_call>')
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    # Mistral's marker is a control token (not in the text) or text; the call's own id is kept
    for text in ('[{"name": "get_time", "arguments": {"zone": "CET"}, "id": "a1b2c3d4e"}]',
                 '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "CET"}, "id": "a1b2c3d4e"}]'):
        content, calls = mistral.parse(text)
        assert content is None and calls[0]["id"] == "a1b2c3d4e" and calls[0]["function"]["name"] == "get_time"
    content, calls = llama3.parse('{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    for fmt, text in ((hermes, "It is sunny."), (hermes, '<tool_call>\n{"name": "get_time", "argu'),  # cut short
                      (mistral, "[1, 2]"), (llama3, '{"answer": 4}'), (llama3, "Four.")):
        assert fmt.parse(text) == (text, None)


def test_the_conversation_reaches_the_template_as_it_reads_it():
    """OpenAI sends a call's arguments as a JSON string; templates write them with tojson (an object).
    Mistral's templates refuse an id that is not nine letters or digits: the call and its result get
    the same one."""
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "4 degrees"}]
    out = tool_formats.template_messages(messages, tool_formats.FORMATS["mistral"])
    call = out[1]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Oslo", "unit": "celsius"} and out[1]["content"] == ""
    assert len(call["id"]) == 9 and call["id"].isalnum() and out[2]["tool_call_id"] == call["id"]
    kept = tool_formats.template_messages(messages, tool_formats.FORMATS["hermes"])
    assert kept[1]["tool_calls"][0]["id"] == "call_abc" and kept[2]["tool_call_id"] == "call_abc"


# ---------------------------------------------------------------- with models: rendering and grammars


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random-weight llama ("small" shape) per template."""
    folder = tmp_path_factory.mktemp("tool-models")
    shape = dict(SMALL["llama"])
    arch = shape.pop("arch")
    return {name: write_model(folder / f"{name}.gguf", arch, chat_template=template, **shape)
            for name, template in TEMPLATES.items()}


@pytest.fixture(scope="module")
def loaded(tiny_models, engine_verdict):
    from orion_cli import engine

    models = {name: engine.load(engine.LoadSpec(path, 4096, 2), check=engine_verdict)
              for name, path in tiny_models.items()}
    yield models
    for m in models.values():
        m.close()


def _asked(messages, **doc):
    from orion_cli.server.openai import Asked

    return Asked.parse({"model": "m", "messages": messages, **doc}, chat=True)


def _prompt_text(model, gen) -> str:
    tokens, _ = gen.prompt_tokens()
    return model._llm.detokenize(tokens, special=True).decode().replace("\u2581", " ")  # the made-up pieces keep ▁


def test_the_template_writes_the_tools_and_orions_own_instructions_stay_out(loaded):
    for name, model in loaded.items():
        asked = _asked(ASK, tools=[WEATHER, TIME])
        gen = asked.generation(model, {"max_tokens": 8})
        text = _prompt_text(model, gen)
        assert asked.tool_format == name
        assert "get_weather" in text and "The time in a time zone." in text, text
        assert "You can call these tools" not in text  # orion's generic format is not used


def test_a_round_trip_renders_the_call_and_its_result_in_the_templates_words(loaded):
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    expected = {"hermes": ("<tool_response>\n18 degrees and sunny\n</tool_response>",
                           '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'),
                "mistral": ('[TOOL_RESULTS]{"content": "18 degrees and sunny"',
                            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}'),
                "llama3": ("ipython<|end_header_id|>\n\n18 degrees and sunny",
                           '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}')}
    for name, model in loaded.items():
        gen = _asked(messages, tools=[WEATHER]).generation(model, {"max_tokens": 8})
        text = _prompt_text(model, gen)
        for part in expected[name]:
            assert part in text, (name, text)
        assert "The result of" not in text  # orion's generic words for a result


def test_required_calls_come_in_the_models_format_and_validate(loaded):
    for name, model in loaded.items():
        for parallel in (False, True):
            asked = _asked(ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel)
            gen = asked.generation(model, {"max_tokens": 200, "temperature": 0.8, "seed": 1})
            text = gen.run()
            content, calls = asked.tool_answer(text)
            assert calls, (name, text)
            assert parallel or len(calls) == 1
            if name == "hermes":
                assert text.startswith("<tool_call>\n")
            elif name == "mistral":
                assert all(len(c["id"]) == 9 for c in calls)
            for c in calls:
                jsonschema.validate(json.loads(c["function"]["arguments"]),
                                    TOOLS[c["function"]["name"]]["function"]["parameters"])


def test_a_named_tool_is_the_one_called(loaded):
    for name, model in loaded.items():
        asked = _asked(ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
        _, calls = asked.tool_answer(asked.generation(model, {"max_tokens": 200, "seed": 2}).run())
        assert calls and {c["function"]["name"] for c in calls} == {"get_time"}, name


def test_auto_waits_for_the_formats_opening(loaded):
    """With "auto" the grammar is lazy (it holds the text from the format's opening on): the answer is
    words or calls, never orion's generic JSON; a random model's words end by max_tokens or EOS."""
    for name, model in loaded.items():
        asked = _asked(ASK, tools=[WEATHER, TIME])
        gen = asked.generation(model, {"max_tokens": 24, "seed": 5})
        assert gen.options["grammar_triggers"] == [tool_formats.FORMATS[name].trigger]
        text = gen.run()
        content, calls = asked.tool_answer(text)
        assert calls is None or all(c["function"]["name"] in TOOLS for c in calls)
        assert calls is not None or content == text
        assert not text.startswith('{"tool_calls"') and not text.startswith('{"response"')


# ---------------------------------------------------------------- through `orion serve`, the openai client


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, engine_check_cache):
    import os
    import shutil

    home = tmp_path_factory.mktemp("tool-formats-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"ORION_HOME": str(home)}
    for name, path in tiny_models.items():
        subprocess.run([sys.executable, "-m", "orion_cli", "import", str(path), "--name", f"{name}-tiny"],
                       env=env, check=True, capture_output=True)
    shutil.copy(engine_check_cache, home / "engine-check.json")
    s = Server(home, env={"ORION_CTX": "4096"})
    yield s
    code = s.stop()
    print("".join(s.lines))
    assert code == 0


def test_the_openai_client_gets_calls_from_a_template_with_tools(server):
    client = server.client()
    for name in TEMPLATES:
        reply = client.chat.completions.create(model=f"{name}-tiny", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", parallel_tool_calls=False,
                                               max_tokens=200, temperature=0.8, seed=4)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name]["function"]["parameters"])
        # the round trip: the call and its result go back, in the template's words
        follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
        again = client.chat.completions.create(model=f"{name}-tiny", messages=follow, tools=[WEATHER, TIME],
                                               tool_choice="none", max_tokens=4, seed=4)
        alone = client.chat.completions.create(model=f"{name}-tiny", messages=ASK, max_tokens=4, seed=4)
        assert again.choices[0].finish_reason in ("stop", "length")
        # the call and its result are in the prompt (each a few dozen tokens, byte by byte in this vocabulary)
        assert again.usage.prompt_tokens > alone.usage.prompt_tokens + 20
