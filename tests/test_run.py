"""`orion run` as a user runs it: real generation, JSON, stdin, fetch-on-demand, bad input."""

import json
import struct
import zlib
from pathlib import Path

import pytest
from conftest import LADDER_REPO, assert_clean_error


def tiny_png(path: Path) -> Path:
    """A real 2x2 PNG image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\xff\x00\x00" * 2 for _ in range(2))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def gemma_name(orion, gemma_q4):
    assert orion("import", str(gemma_q4), "--name", "gemma3-270m").returncode == 0
    return "gemma3-270m"


def test_run_json(orion, gemma_name):
    proc = orion("run", gemma_name, "The capital of France is Paris. The capital of Germany is",
                 "--temperature", "0", "--max-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "Berlin" in data["text"]
    t = data["timings"]
    assert t["load_s"] > 0 and t["generated_tokens"] >= 5 and t["generation_tok_s"] > 0 and t["prompt_tokens"] > 5


def test_run_streams_text_and_verbose_timings(orion, gemma_name):
    proc = orion("run", gemma_name, "Monday, Tuesday, Wednesday,", "--temperature", "0", "--max-tokens", "4",
                 "--verbose")
    assert proc.returncode == 0 and "Thursday" in proc.stdout
    assert "tok/s" in proc.stderr and "load" in proc.stderr


def test_prompt_from_stdin(orion, gemma_name):
    proc = orion("run", gemma_name, "--temperature", "0", "--max-tokens", "6", input="The chemical symbol for gold is")
    assert proc.returncode == 0 and "Au" in proc.stdout


def test_run_fetches_a_missing_model_first(orion, hub):
    assert orion("profile", "--ram", "1GB").returncode == 0
    proc = orion("run", LADDER_REPO, "One, two, three, four,", "--temperature", "0", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "five" in json.loads(proc.stdout)["text"]
    models = json.loads(orion("list", "--json").stdout)["models"]
    assert [m["file_type"] for m in models] == ["Q4_K_M"]  # fetched with --auto for the 1 GB tier


def test_model_that_never_fits_is_refused_with_a_hint(orion, gemma_name, gemma_q4, engine_verdict):
    from orion_cli.engine import settings_for
    from orion_cli.estimate import estimate_memory
    from orion_cli.gguf_header import read_local_header
    from orion_cli.units import format_bytes

    # the estimate depends on this machine's engine settings (weight repacking on or off, AMX or
    # not), so the budget is set between what 2048 and 8192 tokens of context need here
    header, settings = read_local_header(gemma_q4), settings_for(engine_verdict)
    needs = estimate_memory(header, 8192, settings).total_bytes
    fits = estimate_memory(header, 2048, settings).total_bytes
    assert fits + 16 * 2**20 < needs
    budget = f"{(fits >> 20) + 8}MiB"
    proc = orion("run", gemma_name, "Hi", env={"ORION_MEMORY_BUDGET": budget, "ORION_CTX": "8192"})
    assert_clean_error(proc, f"needs {format_bytes(needs)}", "budget", "--ctx 2048 fits", code=5)


def test_image_on_a_text_model(orion, gemma_name, tmp_path):
    proc = orion("run", gemma_name, "What is this?", "--image", str(tiny_png(tmp_path / "x.png")))
    assert_clean_error(proc, "text-only model", code=2)


def test_image_that_is_not_an_image(orion, gemma_name, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    assert_clean_error(orion("run", gemma_name, "x", "--image", str(notes)), "is not an image", code=2)
    assert_clean_error(orion("run", gemma_name, "x", "--image", str(tmp_path / "missing.png")), "no such image", code=4)


@pytest.mark.parametrize(
    "make,message,code",
    [
        (lambda p: p.write_bytes(bytes(range(256)) * 64), "not a GGUF file", 7),
        (lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 50, 1 << 50) + b"\0" * 64), "claims", 7),
        (lambda p: p.mkdir(), "is a directory", 7),
        (lambda p: None, "no such file", 4),
    ],
    ids=["random-bytes", "absurd-counts", "directory", "missing"],
)
def test_bad_model_files(orion, tmp_path, make, message, code):
    path = tmp_path / "model.gguf"
    make(path)
    assert_clean_error(orion("run", str(path), "hello"), message, code=code)


def test_truncated_model(orion, gemma_q4, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gemma_q4, "rb") as f:
        cut.write_bytes(f.read(100_000_000))
    assert_clean_error(orion("run", str(cut), "hello"), "truncated", code=7)


def test_second_request_pays_no_load_time(gemma_q4):
    from orion_cli.manager import ModelManager
    from orion_cli.models import LocalModel
    from orion_cli.loading import model_request
    from orion_cli.strategy import load_strategy

    strategy = load_strategy({"n_ctx": 1024})
    local = LocalModel(name="g", kind="llm", path=str(gemma_q4), source="path")
    m = ModelManager(max_models=2, budget_bytes=strategy.memory_budget_bytes, keep_alive_s=60)
    request = model_request(local, strategy)
    with m.use(request) as first:
        "".join(first.generate("Hi", max_tokens=2, temperature=0.0))
    with m.use(model_request(local, strategy)) as second:
        assert second is first
    assert [e.kind for e in m.events] == ["loading", "loaded"]
    m.close()


def test_repl_in_a_terminal(gemma_name, orion_home):
    """The REPL, driven through a pseudo-terminal as a person would type."""
    from conftest import Terminal

    with Terminal(["run", gemma_name, "--temperature", "0", "--max-tokens", "4", "--ctx", "256"]) as term:
        term.expect(r">>> ")
        term.send("One, two, three, four,")
        term.expect(r"five[\s\S]*>>> ")
        term.send("/ps")
        out = term.expect(r"budget[\s\S]*>>> ")
        assert "gemma3-270m" in out and "idle" in out and "1 of" in out
        term.send("/clear")
        term.expect(r"conversation cleared")
        term.send("/load no-such-model")  # one error line; the REPL and its model stay
        assert "still talking to the same model" in term.expect(r"error:[\s\S]*>>> ")
        term.send("word " * 300)  # past the context: one error line, the REPL goes on
        assert "the context holds 256" in term.expect(r"error:[\s\S]*>>> ")
        term.send("Six, seven,")
        term.expect(r"eight[\s\S]*>>> ")
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
    assert (orion_home / "history").exists()


def test_a_prompt_longer_than_the_context(orion, gemma_name, tmp_path):
    """`orion run MODEL < big.txt`: one line naming the sizes, exit 2, nothing evaluated. The words
    come from llama-cpp-python's own check (engine._LLAMA_CPP_TOO_LONG): this fails if they change."""
    big = tmp_path / "big.txt"
    big.write_text("word " * 200_000)
    for extra in ([], ["--system", "be brief"]):
        proc = orion("run", gemma_name, "--local", "--ctx", "512", *extra, input=big.read_text())
        assert_clean_error(proc, "the context holds 512", code=2)
        assert "200,0" in proc.stderr  # the prompt's size in tokens
