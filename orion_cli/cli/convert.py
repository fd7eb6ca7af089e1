"""``orion convert``: a BERT-family encoder in Hugging Face format to GGUF, without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._options import GgufOutOpt, ReplaceOutOpt, json_option
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion convert ./all-MiniLM-L6-v2 -o minilm-f16.gguf", "a local model folder"),
    ("orion convert minilm --to q8_0 -o minilm-q8.gguf", "a catalog name, fetched first"),
    ("orion convert sentence-transformers/all-MiniLM-L12-v2 -o m.gguf", "any BERT repo on the Hub"),
)


@json_option("Print the result as JSON.")
def convert(
    source: Annotated[str, typer.Argument(help="A Hugging Face model folder, a catalog name (minilm) or org/repo.")],
    output: GgufOutOpt,
    to: Annotated[str, typer.Option("--to", help="Weight type: f32, f16, bf16 or q8_0.", metavar="TYPE")] = "f16",
    force: ReplaceOutOpt = False,
) -> None:
    """Convert a BERT encoder (safetensors, config, WordPiece vocabulary) to a GGUF llama.cpp loads.

    Mean or CLS pooling comes from the sentence-transformers config; no torch is
    needed. The file appears only when complete (a temporary name until then).
    """
    from ..convert import convert_bert
    from ..errors import InvalidValue
    from ..units import format_bytes

    if not source.strip():  # Path("") is the current folder
        raise InvalidValue("an empty source was given", hint="give a model folder, a catalog name or org/repo")
    from ..models import on_disk, output_path

    output = output_path(output)  # ~user not here, a name too long for a file: one line, before any work
    if on_disk(output) and not force:
        raise InvalidValue(f"{output} already exists", hint="choose another -o, or add --force")
    folder = _source_folder(source)
    result = convert_bert(folder, output, to)
    out.result({"path": str(result.path), "type": result.target, "tensors": result.tensors,
                "parameters": result.parameters, "size_bytes": result.size_bytes, "pooling": result.pooling},
               lambda: f"Wrote [bold]{escape(result.path)}[/]: {result.target}, {result.tensors} tensors, "
                       f"{result.parameters / 1e6:.1f} M parameters, {format_bytes(result.size_bytes)}, "
                       f"{result.pooling} pooling")


def _source_folder(source: str) -> Path:
    """A local folder as is; a catalog name or Hub repo fetched into the HF cache first."""
    from ..models import on_disk, user_path

    path = user_path(source)  # ~user for a user not here: NotFound
    if on_disk(path) and path.is_dir():  # a name too long for a file names no folder
        return path
    from ..snapshots import fetch_snapshot
    from ..models import ModelRef, resolve

    ref = resolve(source)
    if ref.local is not None and on_disk(Path(ref.local.path)) and Path(ref.local.path).is_dir():
        return Path(ref.local.path)
    if ref.repo is None:
        from .._text import clip
        from ..errors import NotFound

        raise NotFound(f"no model folder {clip(source, 200)}", hint="pass a folder with config.json and model.safetensors")
    if not ref.files:
        ref = ModelRef(ref.name, "encoder", ref.source, repo=ref.repo, format="safetensors",
                       files=("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                              "tokenizer_config.json", "special_tokens_map.json", "modules.json",
                              "sentence_bert_config.json", "1_Pooling/config.json"))
    return Path(fetch_snapshot(ref).path)
