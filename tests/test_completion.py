"""Shell completion: `orion completion SHELL` prints the script; the shell's questions (the
_ORION_COMPLETE variable, as the scripts set it) get commands, options and model names."""

from __future__ import annotations

import pytest
from conftest import assert_clean_error


def complete(orion, shell: str, words: str) -> list[str]:
    env = {"_ORION_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        env |= {"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    else:
        env |= {"_TYPER_COMPLETE_ARGS": words}
        if shell == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    proc = orion(env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_scripts(orion, shell):
    proc = orion("completion", shell)
    assert proc.returncode == 0 and f"_ORION_COMPLETE=complete_{shell}" in proc.stdout


def test_commands_options_and_model_names(orion, gemma_q4):
    assert complete(orion, "bash", "orion pro") == ["profile"]
    assert complete(orion, "bash", "orion run --te") == ["--temperature"]
    assert "--gpu-layers" in complete(orion, "bash", "orion serve --")
    assert orion("import", str(gemma_q4), "--name", "gemma3-270m").returncode == 0
    assert complete(orion, "bash", "orion run gem") == ["gemma3-270m"]
    assert "gemma3-270m" in complete(orion, "bash", "orion rm g")
    assert any("mistral" in w for w in complete(orion, "zsh", "orion fetch mis"))  # the catalog too
    assert any(w.startswith("stop") for w in complete(orion, "fish", "orion st"))


def test_unknown_shell(orion):
    assert_clean_error(orion("completion", "tcsh"), "no completion for shell", code=2)
