"""``orion quantize``: make any quantization level of a GGUF."""

from __future__ import annotations

from typing import Annotated

import typer

from ._options import GgufOutOpt, LocalModelArg, ReplaceOutOpt, json_option
from ._output import escape, examples, out

EXAMPLES = examples(
    ("orion quantize model-f16.gguf --to Q4_K_M -o model-q4.gguf", "a GGUF type"),
    ("orion quantize model-f16.gguf --to q8 -o model-q8.gguf", "a strategy level: q4 q8 q16 q32"),
    ("orion quantize gemma3-270m --to Q8_0 -o g-q8.gguf --allow-requantize", "from a quantized model"),
)


@json_option("Print the result as JSON.")
def quantize(
    model: LocalModelArg,
    to: Annotated[str, typer.Option("--to", help="A level (q4 q8 q16 q32) or a type (Q4_K_M, Q5_K_M, Q8_0, F16, IQ4_XS...).", metavar="TYPE")],
    output: GgufOutOpt,
    force: ReplaceOutOpt = False,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Quantize an already quantized model (quality drops twice).")] = False,
) -> None:
    """Quantize a GGUF with llama.cpp's quantizer (threads from the strategy).

    The output appears only when complete and of the type asked for; Ctrl-C or a
    failure leaves nothing under its name.
    """
    from ..models import local_path, output_path, user_path
    from ..quantize import quantize as do_quantize
    from ..strategy import load_strategy
    from ..units import format_bytes

    strategy = load_strategy()
    path = local_path(model) or user_path(model)  # ~user not here, a name too long for a file: NotFound
    output = output_path(output)

    def warn(current: str) -> None:
        out.warning(f"{path.name} is already {current}: quality drops twice "
                    f"(its quantization loss and the new one add up)")
    status = out.status(f"Quantizing {path.name} to {to}…")
    with status:
        result = do_quantize(path, output, to, threads=strategy.threads, force=force,
                             allow_requantize=allow_requantize, on_requantize=warn,
                             on_tick=lambda s: status.update(f"Quantizing {path.name} to {to}… {s:.0f} s"))
    out.result({"input": str(result.src), "output": str(result.dst), "type": result.type_name,
                "input_bytes": result.src_bytes, "output_bytes": result.dst_bytes, "ratio": round(result.ratio, 4),
                "seconds": round(result.seconds, 2), "requantized": result.requantized},
               lambda: f"{escape(result.src.name)} ({format_bytes(result.src_bytes)}) → [bold]{escape(result.dst)}[/] "
                       f"({escape(result.type_name)}, {format_bytes(result.dst_bytes)}, {result.ratio:.0%} of the input) "
                       f"in {result.seconds:.1f} s")
