"""The CLI's one output object and its shared options: ``--json`` declared once, by the command class,
on the commands that print JSON; the mode set before each command runs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

CLI = Path(__file__).resolve().parent.parent / "orion_cli" / "cli"

# every command with --json, and its line in --help
JSON_COMMANDS = {
    "profile": "Print the strategy as JSON on stdout.",
    "strategy": "Print the settings and their sources as JSON.",
    "run": "Print one JSON object at the end: text and timings.",
    "fetch": "Print the plan and the result as JSON.",
    "import": "Print the registered entry as JSON.",
    "list": "Print the models as JSON.",
    "rm": "Print what was removed as JSON.",
    "inspect": "Print the header summary and estimate as JSON.",
    "convert": "Print the result as JSON.",
    "embed": "Print the summary as JSON.",
    "search": "Print the results as JSON.",
    "collections": "Print as JSON.",
    "quantize": "Print the result as JSON.",
    "eval": "Print the results as JSON.",
    "rpc-server": "Print one JSON line when ready (endpoint, devices, memory), then one per client event.",
    "ps": "Print the server's answer as JSON.",
    "load": "Print the server's answer as JSON.",
}


@pytest.fixture(scope="module")
def group():
    import typer

    from orion_cli.cli import _register, app

    if not app.registered_commands:
        _register()
    return typer.main.get_command(app)


def test_json_is_on_the_commands_that_print_json_and_no_other(group):
    have = {}
    for name, command in group.commands.items():
        option = next((p for p in command.params if "--json" in getattr(p, "opts", ())), None)
        if option is not None:
            have[name] = option.help
    assert have == JSON_COMMANDS


def test_no_leaf_command_declares_json_or_branches_on_it():
    """One declaration (the command class in _options.py); commands hand results to the Output object."""
    for path in CLI.glob("*.py"):
        if path.name == "_options.py":
            continue
        text = path.read_text()
        assert '"--json"' not in text and "json_output" not in text, path.name
        tree = ast.parse(text)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print_json"]
        assert not calls or path.name == "_output.py", f"{path.name} prints JSON itself"


def test_rpc_is_declared_once():
    texts = [p.read_text() for p in CLI.glob("*.py")]
    assert sum(t.count('"--rpc"') for t in texts) == 1


def test_help_shows_json_and_examples(orion):
    for command in ("list", "ps", "fetch", "rpc-server", "run"):
        proc = orion(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "--json" in proc.stdout and JSON_COMMANDS[command].split()[0] in proc.stdout
        assert "Examples" in proc.stdout


def test_output_modes(capsys):
    from orion_cli.cli._output import Output

    out = Output()
    out.result({"a": 1}, lambda: "for [bold]people[/]")
    out.text("more")
    out.write("streamed")
    assert capsys.readouterr().out == "for people\nmore\nstreamed"
    out.set_mode("json")
    out.result({"a": 1}, lambda: pytest.fail("no human rendering in JSON mode"))
    out.text("not in JSON")
    out.write("nor this")
    out.table(["x"], [[1]])
    out.event({"event": "ready"}, "ready")
    out.notice("on stderr, in both modes")
    captured = capsys.readouterr()
    first, line = captured.out.split("}\n", 1)
    assert json.loads(first + "}") == {"a": 1} and json.loads(line) == {"event": "ready"}
    assert "notice: on stderr, in both modes" in captured.err
    with pytest.raises(ValueError):
        out.set_mode("yaml")


def test_notices_and_warnings_are_one_line_whatever_the_width(capsys, monkeypatch):
    """A notice naming a long path is one line on stderr, even where COLUMNS is set (the terminal wraps
    it if it must; Rich does not cut it into lines)."""
    from orion_cli.cli._output import Output, err_console

    monkeypatch.setenv("COLUMNS", "40")
    err_console.cache_clear()
    try:
        out = Output()
        for say in (out.notice, out.warning, out.note, out.error):
            say("the server takes only its registered models, not /a/very/long/path/" + "d" * 120 + "/model.gguf")
        lines = capsys.readouterr().err.splitlines()
    finally:
        err_console.cache_clear()
    assert len(lines) == 4 and all(line.endswith("/model.gguf") for line in lines)


def test_the_mode_is_set_for_each_command(orion):
    """JSON and human runs of the same command (each process sets its mode before the command runs)."""
    doc = json.loads(orion("list", "--json").stdout)
    assert doc["models"] == [] and set(doc) == {"n_ctx", "budget_bytes", "models"}
    assert orion("list").stdout.startswith("No models yet")
    assert json.loads(orion("collections", "--json").stdout) == {"collections": []}


def test_the_command_class_sets_the_mode_in_process(group, capsys, orion_home):
    from orion_cli.cli._output import out

    group.main(["strategy", "--json"], standalone_mode=False)
    assert out.json and json.loads(capsys.readouterr().out)["file_exists"] is False
    group.main(["strategy"], standalone_mode=False)
    assert not out.json and "setting" in capsys.readouterr().out
