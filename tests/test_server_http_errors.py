"""One table between orion's errors and HTTP: an error the server answers comes back, in the CLI's
client, as the same class with the same exit code (a broken GGUF is exit 7 through a server as it is
in-process). Each class is raised inside a real route of the app, answered by the route wrapper, and
read back by the client's own decoder."""

from __future__ import annotations

import json

import pytest
from test_server_inprocess import call

from orion_cli.errors import (ConfigError, DoesNotFit, EngineFault, InvalidValue, ModelInUse, NetworkError, NotAGGUF,
                              NotFound, OrionError, WrongModelKind)
from orion_cli.manager import ModelDoesNotFit
from orion_cli.server.state import QueueFull

# (the error the server meets, the status it answers, the class the client raises)
CASES = [
    (QueueFull("gemma3-270m", 4), 503, QueueFull),
    (NotFound("unknown model: x", hint="orion list"), 404, NotFound),
    (DoesNotFit("x needs 9 GiB", hint="--ctx 512 fits"), 507, DoesNotFit),
    (ModelDoesNotFit("x needs 9 GiB; 2 of 2 models loaded", hint="unload one"), 507, DoesNotFit),
    (NotAGGUF("x.gguf is not a GGUF file", hint="check the file"), 422, NotAGGUF),
    (InvalidValue("the prompt is 5,000 tokens; the context holds 2,048", hint="a shorter prompt"), 400, InvalidValue),
    (WrongModelKind("minilm is an encoder", hint="use it with /v1/embeddings"), 400, WrongModelKind),
    (ModelInUse("x is in use", hint="try again"), 409, ModelInUse),
    (ConfigError("ORION_THREADS is not a number"), 500, ConfigError),
    (NetworkError("the RPC server 10.0.0.2:50052 went away"), 502, NetworkError),
    (EngineFault("llama.cpp crashed (SIGSEGV)"), 500, EngineFault),
]


@pytest.fixture
def served_error(monkeypatch):
    """``served_error(exc, api_key=None)``: the (status, headers, body) the app answers a completion
    with when resolving its model raises ``exc``."""
    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    states = []

    def answer(exc, *, api_key=None, headers=None):
        state = ServerState(load_strategy({}))
        states.append(state)

        def llm(name):
            raise exc

        state.llm = llm
        app = create_app(state, api_key=api_key)
        return call(app, "POST", "/v1/completions", {"model": "x", "prompt": "hi"}, headers=headers)

    yield answer
    for state in states:
        state.close()


@pytest.mark.parametrize("exc,status,cls", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_an_error_comes_back_as_its_own_class_and_exit_code(served_error, exc, status, cls):
    from orion_cli.server.client import _error

    got, headers, payload = served_error(exc)
    assert got == status, payload
    err = json.loads(payload)["error"]
    assert err["message"] == exc.message and "Traceback" not in payload.decode()
    back = _error(got, payload, headers.get("retry-after"))
    assert type(back) is cls, (type(back).__name__, err)
    assert back.exit_code == exc.exit_code and back.message == exc.message and back.hint == exc.hint
    if isinstance(exc, QueueFull):
        assert headers["retry-after"] == "1" and err["code"] == "queue_full" and back.retry_after_s == 1


def test_a_wrong_key_is_401_and_the_client_says_which_key(served_error):
    from orion_cli.server.client import _error

    got, _, payload = served_error(NotFound("never reached"), api_key="s3cret")
    assert got == 401 and json.loads(payload)["error"]["type"] == "authentication_error"
    back = _error(got, payload)
    assert back.exit_code == 1 and "ORION_API_KEY" in back.hint
    assert served_error(NotFound("reached"), api_key="s3cret", headers={"Authorization": "Bearer s3cret"})[0] == 404


def test_an_unknown_code_falls_back_to_its_status_and_an_internal_error_stays_one_line(served_error):
    from orion_cli.server.client import ServerError, _error

    body = json.dumps({"error": {"message": "bad", "type": "invalid_request_error", "code": "invalid_json"}}).encode()
    assert type(_error(400, body)) is InvalidValue
    assert type(_error(413, body)) is InvalidValue
    assert type(_error(404, json.dumps({"error": {"message": "x is not loaded", "code": "model_not_loaded"}}
                                       ).encode())) is NotFound
    assert type(_error(502, b"<html>bad gateway</html>")) is NetworkError
    got, _, payload = served_error(KeyError("a bug"))
    assert got == 500 and "KeyError" in json.loads(payload)["error"]["message"]
    assert type(_error(got, payload)) is ServerError
    assert type(_error(500, json.dumps({"error": {"message": "m", "code": "server_error"}}).encode())) is ServerError


def test_every_row_of_the_table_is_covered_and_each_code_names_one_class():
    from orion_cli.server.http_errors import TABLE, Unauthorized

    codes = [row.code for row in TABLE]
    assert len(codes) == len(set(codes))
    assert {row.cls for row in TABLE} == {c for _, _, c in CASES} | {Unauthorized, OrionError}
    for exc, status, cls in CASES:  # the more specific rows come first
        assert next(r for r in TABLE if isinstance(exc, r.cls)).cls is cls


def test_in_use_and_encoder_are_found_by_type_not_by_words():
    """'is an encoder' and 'in use' are classes the server and the client share, never matched in a
    message's text."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "orion_cli" / "server"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
                assert not any("encoder" in t or "in use" in t for t in texts), f"{path.name}:{node.lineno}"
