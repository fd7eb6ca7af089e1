"""Structured outputs: a response format (OpenAI's ``response_format``) as a llama.cpp grammar.

``json_object`` is llama.cpp's JSON grammar (any object); ``json_schema`` is the schema turned into
GBNF by llama-cpp-python's port of llama.cpp's ``json-schema-to-grammar`` (the one llama.cpp's server
uses), so every token drawn keeps the text a prefix of a document the schema accepts. The grammar
sampler leads each sequence's chain (:func:`orion_cli.engine.sampling.sampler_chain`).
"""

from __future__ import annotations

import json

from ..errors import InvalidValue

# Keywords that constrain a value and that the converter does not turn into grammar: a schema with
# one is refused (naming it) rather than followed in part. Annotations (title, description, default,
# examples...) do not constrain and are fine.
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
              "minProperties", "maxProperties", "not", "if", "then", "else", "patternProperties", "contains",
              "minContains", "maxContains", "dependentRequired", "dependentSchemas", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems")


def _unenforced(schema, path: str) -> tuple[str, str] | None:
    """The first (path, keyword) in ``schema`` that the grammar would not enforce."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            if (found := _unenforced(item, f"{path}[{i}]")) is not None:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    for key in UNENFORCED:
        if key in schema:
            return path, key
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                if (found := _unenforced(sub, f"{path}.{key}.{name}")) is not None:
                    return found
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
            if (found := _unenforced(value, f"{path}.{key}")) is not None:
                return found
    return None


def grammar_for(response_format: dict | None) -> str | None:
    """The GBNF of a checked ``response_format`` (``{"type": "text"}`` or none: no grammar). orion's own
    type ``tool_calls`` (never a client's: the server checks theirs) holds the answer to tool calls in a
    template's format: ``schema`` (one call), ``opening``, ``separator``, ``closing``."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "tool_calls":
        return tool_call_grammar(response_format["schema"], response_format["opening"],
                                 response_format["separator"], response_format["closing"])
    from llama_cpp import llama_grammar

    if response_format["type"] == "json_object":
        return llama_grammar.JSON_GBNF
    return _schema_gbnf(response_format["json_schema"]["schema"], "schema", "response_format.json_schema.",
                        "the schema (and check it in your code), or ask without a schema")


def _schema_gbnf(schema: dict, path: str, prefix: str, leave_out_of: str) -> str:
    """The GBNF of a JSON schema, by llama-cpp-python's converter; a keyword the grammar would not
    enforce, or a schema the converter cannot follow, is an error that names it (``path``: where the
    schema is, ``prefix`` before it in the message; ``leave_out_of``: what the hint says to change)."""
    from llama_cpp import llama_grammar

    found = _unenforced(schema, path)
    if found is not None:
        where, key = found
        raise InvalidValue(f"{prefix}{where} has '{key}', which orion's grammar does not enforce",
                           hint=f"leave '{key}' out of {leave_out_of}")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
        raise InvalidValue(f"{prefix}{path} cannot be followed: {exc}",
                           hint="use the JSON-schema keywords llama.cpp's json-schema-to-grammar supports "
                                "(type, properties, required, items, enum, const, anyOf, minLength...)") from None


def _renamed_root(gbnf: str, new: str) -> str:
    """``gbnf`` with its rule ``root`` named ``new`` (references too; quoted text and classes untouched)."""
    out, i = [], 0
    while i < len(gbnf):
        ch = gbnf[i]
        if ch in "\"[":  # a literal or a character class: copied as it is, escapes included
            end, close = i + 1, '"' if ch == '"' else "]"
            while end < len(gbnf) and gbnf[end] != close:
                end += 2 if gbnf[end] == "\\" else 1
            out.append(gbnf[i:end + 1])
            i = end + 1
            continue
        if gbnf.startswith("root", i) and (i == 0 or not (gbnf[i - 1].isalnum() or gbnf[i - 1] == "-")) \
                and not (i + 4 < len(gbnf) and (gbnf[i + 4].isalnum() or gbnf[i + 4] == "-")):
            out.append(new)
            i += 4
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def tool_call_grammar(call_schema: dict, opening: str, separator: str | None, closing: str) -> str:
    """The GBNF of an answer made of tool calls in a template's format: ``opening``, a call (a JSON
    object ``call_schema`` accepts), more calls each after ``separator`` (None: one call), ``closing``."""
    calls = _renamed_root(_schema_gbnf(call_schema, "tools", "",
                                       "the tool's parameters (and check it in your code)"), "tool-call")
    more = f" ({json.dumps(separator)} tool-call)*" if separator is not None else ""
    lead = f"{json.dumps(opening)} " if opening else ""
    tail = f" {json.dumps(closing)}" if closing else ""
    return f"root ::= {lead}tool-call{more}{tail}\n{calls}"
