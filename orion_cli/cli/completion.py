"""``orion completion SHELL``: the script that lets bash, zsh or fish complete orion's commands,
options and model names. The shell runs orion with ``_ORION_COMPLETE`` set to ask for completions;
that path is taken only then, so it costs nothing to every other start. Model names complete
through ``_options.model_names``, the model arguments' completer."""

from __future__ import annotations

from typing import Annotated

import typer

from ._output import examples

SHELLS = ("bash", "zsh", "fish")

EXAMPLES = examples(
    ('eval "$(orion completion bash)"', "complete in this bash session"),
    ("orion completion bash >> ~/.bashrc", "... and in every new one"),
    ("orion completion zsh > ~/.zfunc/_orion", "zsh (with ~/.zfunc in fpath, then compinit)"),
    ("orion completion fish > ~/.config/fish/completions/orion.fish", "fish"),
)


def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", metavar="SHELL")],
) -> None:
    """Print the completion script for SHELL: commands, options and model names complete with Tab."""
    from ..errors import InvalidValue

    name = shell.strip().lower()
    if name not in SHELLS:
        raise InvalidValue(f"no completion for shell {shell!r}", hint=f"choose one of {', '.join(SHELLS)}")
    from typer._completion_shared import get_completion_script

    from . import COMPLETE_VAR

    print(get_completion_script(prog_name="orion", complete_var=COMPLETE_VAR, shell=name))
