"""Convert a BERT-family encoder in Hugging Face format to a GGUF llama.cpp loads: no torch.

Reads ``config.json``, ``model.safetensors`` (with safetensors' numpy backend),
the WordPiece vocabulary and the sentence-transformers pooling config, and
writes what llama.cpp's own converter (``convert_hf_to_gguf.py``,
``BertModel``) writes: arch ``bert``, non-causal attention, the pooling type,
the vocabulary in llama.cpp's "phantom space" spelling, the special tokens,
and the tensors under the names ``gguf.get_tensor_name_map`` gives.

A process that loads the encoder after converting it converts in a child
(:func:`convert_bert_apart`): the conversion's libraries (numpy, safetensors,
gguf) must not be loaded before llama.cpp's in the process that loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import DoesNotFit, InvalidValue, NotAGGUF, NotFound

TARGETS = ("f32", "f16", "bf16", "q8_0")
MAX_SEQ_KEY = "sentence_transformers.max_seq_length"
_SKIP = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    target: str
    tensors: int
    parameters: int
    size_bytes: int
    pooling: str


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{path.parent} has no {path.name}", hint="pass a Hugging Face model folder") from None
    except ValueError as exc:
        raise InvalidValue(f"{path} is not valid JSON: {exc}", hint="the model folder is damaged") from None


def pooling_of(folder: Path) -> str:
    """'mean' or 'cls', from the sentence-transformers modules (default mean)."""
    modules = folder / "modules.json"
    pooling_dir = None
    if modules.exists():
        for m in read_json(modules):
            if m.get("type", "").endswith("Pooling"):
                pooling_dir = folder / m.get("path", "1_Pooling")
    cfg = pooling_dir / "config.json" if pooling_dir else folder / "1_Pooling" / "config.json"
    if cfg.exists():
        p = read_json(cfg)
        if p.get("pooling_mode_cls_token"):
            return "cls"
        if not p.get("pooling_mode_mean_tokens", True):
            raise InvalidValue(f"{cfg}: only mean and CLS pooling are supported",
                               hint="llama.cpp pools with mean, CLS or last token")
    return "mean"


def check_bert_config(config: dict, shapes: dict[str, tuple[int, ...]], where: Path) -> int:
    """The number of layers, once config.json agrees with the weights: every size a positive
    integer, the layer count and the widths those of the tensors (a hostile config must not make
    orion build a billion-layer name table, nor write a GGUF llama.cpp would read past)."""
    hint = "the config does not match model.safetensors: download the model again"
    sizes = {}
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 20:
            raise InvalidValue(f"{where}: {key} must be a whole number from 1 to 1,048,576, not {value!r}",
                               hint=hint)
        sizes[key] = value
    names = {k[5:] if k.startswith("bert.") else k: shape for k, shape in shapes.items()}
    layers = {int(k.split(".")[2]) for k in names if k.startswith("encoder.layer.") and k.split(".")[2].isdigit()}
    if layers != set(range(sizes["num_hidden_layers"])):
        raise InvalidValue(f"{where}: num_hidden_layers is {sizes['num_hidden_layers']}, the weights have "
                           f"{len(layers)} layers", hint=hint)
    word = names.get("embeddings.word_embeddings.weight")
    if word is None or len(word) != 2 or word[1] != sizes["hidden_size"]:
        raise InvalidValue(f"{where}: hidden_size {sizes['hidden_size']} does not match the word embeddings "
                           f"{word}", hint=hint)
    up = names.get("encoder.layer.0.intermediate.dense.weight")
    if up is not None and up[0] != sizes["intermediate_size"]:
        raise InvalidValue(f"{where}: intermediate_size {sizes['intermediate_size']} does not match the weights "
                           f"({up[0]})", hint=hint)
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise InvalidValue(f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of num_attention_heads "
                           f"{sizes['num_attention_heads']}", hint=hint)
    return sizes["num_hidden_layers"]


def check_vocabulary(n_tokens: int, tensors: dict, vocab_file: Path) -> None:
    """The vocabulary has one token per row of the word embeddings (llama.cpp refuses a GGUF whose
    token list and embedding table disagree, and an id past the table would read outside it)."""
    word = tensors.get("embeddings.word_embeddings.weight", tensors.get("bert.embeddings.word_embeddings.weight"))
    rows = int(word.shape[0]) if word is not None and len(word.shape) == 2 else None
    if rows is not None and rows != n_tokens:
        raise InvalidValue(f"{vocab_file} has {n_tokens} tokens, the word embeddings {rows} rows",
                           hint="the vocabulary is not this model's: download the model again")


def convert_bert(folder: Path, out: Path, target: str = "f16") -> ConvertResult:
    """Write ``out`` from the BERT model in ``folder``; a temporary name until complete."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    folder = Path(folder)
    target = target.lower()
    if target not in TARGETS:
        raise InvalidValue(f"--to {target!r} is not a conversion target", hint=f"use one of {', '.join(TARGETS)}")
    if not folder.is_dir():
        raise NotFound(f"no model folder {folder}", hint="pass a folder with config.json and model.safetensors")
    config = read_json(folder / "config.json")
    if config.get("model_type") != "bert":
        raise InvalidValue(f"{folder} holds a {config.get('model_type')!r} model; orion converts BERT encoders",
                           hint="for other models use llama.cpp's convert_hf_to_gguf.py")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise NotFound(f"{folder} has no model.safetensors", hint="orion reads safetensors weights (no torch)")
    vocab_file = folder / "vocab.txt"
    if not vocab_file.exists():
        raise NotFound(f"{folder} has no vocab.txt", hint="a BERT WordPiece vocabulary is needed")

    try:
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidValue(f"{vocab_file} is not UTF-8 text", hint="download the model again") from exc
    if not any(t.strip() for t in tokens):  # an encoder with no words: llama.cpp would load a model that reads nothing
        raise InvalidValue(f"{vocab_file} holds no tokens", hint="the model folder is damaged: download the model again")
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    toktypes = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]

    def phantom(tok: str, kind) -> str:  # llama.cpp's WordPiece spelling (BertModel.set_vocab)
        if kind == gguf.TokenType.CONTROL:
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    pooling = pooling_of(folder)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[target]
    out = Path(out)
    from ._proc import remove_stale_partials

    remove_stale_partials(out.parent, out.name)  # what a killed run left behind
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors' own error types: a damaged or foreign file
        raise NotAGGUF(f"{weights} is not a valid safetensors file ({exc})",
                       hint="download the model again") from exc
    n_layers = check_bert_config(config, {k: tuple(v.shape) for k, v in tensors.items()}, folder / "config.json")
    check_vocabulary(len(tokens), tensors, vocab_file)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    try:
        w = gguf.GGUFWriter(str(tmp), "bert")
        name = folder.name
        if name == "model" or len(name) == 40:  # a package's model/ folder, or an HF snapshot hash
            name = str(config.get("_name_or_path") or name).split("/")[-1]
        w.add_name(name)
        w.add_context_length(int(config.get("max_position_embeddings", 512)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_block_count(n_layers)
        w.add_head_count(int(config["num_attention_heads"]))
        w.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        w.add_causal_attention(False)
        st_config = folder / "sentence_bert_config.json"
        if st_config.exists() and read_json(st_config).get("max_seq_length"):
            # sentence-transformers truncates at this many word pieces; orion's encoder does the same
            w.add_uint32(MAX_SEQ_KEY, int(read_json(st_config)["max_seq_length"]))
        w.add_pooling_type(gguf.PoolingType.MEAN if pooling == "mean" else gguf.PoolingType.CLS)
        w.add_file_type(ftype)
        w.add_token_type_count(int(config.get("type_vocab_size", 2)))
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre("default")
        w.add_token_list([phantom(t, k) for t, k in zip(tokens, toktypes)])
        w.add_token_types(toktypes)
        import logging

        logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # it notes that [CLS] needs no key
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

        count = params = 0
        for hf_name, array in tensors.items():
            name = hf_name[5:] if hf_name.startswith("bert.") else hf_name
            if name in _SKIP:
                continue
            new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise InvalidValue(f"{weights}: no llama.cpp name for tensor {hf_name!r}",
                                   hint="this BERT variant is not supported by orion convert")
            data = np.asarray(array, dtype=np.float32)
            params += data.size
            count += 1
            # llama.cpp adds the position and token-type embeddings to f32 activations and
            # aborts on an f16 operand: its converter keeps both in f32, and so does orion.
            if data.ndim == 1 or target == "f32" or new.startswith(("position_embd", "token_types")):
                w.add_tensor(new, data)
            elif target == "f16":
                w.add_tensor(new, data.astype(np.float16))
            elif target == "bf16":
                w.add_tensor(new, quantize(data, gguf.GGMLQuantizationType.BF16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(new, quantize(data, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except OSError as exc:
            # numpy's tofile reports a short write without an errno ("N requested and M written")
            if exc.errno is None and shutil.disk_usage(tmp.parent).free < (1 << 20):
                raise DoesNotFit(f"no space left on the device for {out}", hint="free some space, then run again") \
                    from exc
            raise
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ConvertResult(out, target, count, params, out.stat().st_size, pooling)



def convert_bert_apart(folder: Path, out: Path, target: str = "f16") -> ConvertResult:
    """:func:`convert_bert` in a child process (``python -m orion_cli.convert FOLDER OUT TARGET``), for a
    process that loads the encoder next (``orion embed``'s first use of an encoder, ``orion profile --bench``).

    That process then loads the encoder as every later command does, with nothing of the conversion
    loaded before llama.cpp: converting here imported numpy (and safetensors, gguf, and sentencepiece where
    gguf finds it) before llama_cpp, an order no later command has, and on the GPU host of issue 23
    (llama.cpp built with CUDA by GCC, its host an AMX Xeon) numpy imported before llama_cpp made the
    encoder's load die with SIGSEGV (docs/benchmarks.md): the first ``orion embed`` after ``orion import``,
    2 of 2 tries. The child's errors keep their class (a full disk, a damaged folder); Ctrl-C stops it."""
    import signal
    import subprocess
    import tempfile

    from ._proc import ErrorChannel, popen_dying_with_process
    from .errors import DoesNotFit, OrionError, signal_name

    folder, out = Path(folder).absolute(), Path(out).absolute()
    what = f"converting {folder.name} to {target}"
    channel = ErrorChannel()
    with tempfile.TemporaryFile(mode="w+", errors="replace") as result, \
            tempfile.TemporaryFile(mode="w+", errors="replace") as log:
        try:
            proc = popen_dying_with_process(
                [sys.executable, "-m", "orion_cli.convert", str(folder), str(out), target],
                stdin=subprocess.DEVNULL, stdout=result, stderr=log, text=True, start_new_session=True,
                **channel.popen_kwargs())
        except BaseException:
            channel.close()
            raise
        channel.started()
        try:
            try:
                proc.wait()
            except BaseException:  # Ctrl-C reaches this process only (the child has a session of its own)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # it had ended
                    pass
                proc.wait()
                raise
            finally:
                out.with_name(f".{out.name}.{proc.pid}.partial").unlink(missing_ok=True)  # a killed child's
            if proc.returncode != 0:
                reported = channel.error()
                if reported is not None:
                    raise reported
                if proc.returncode < 0:
                    name = signal_name(proc.returncode)
                    if name == "SIGKILL":
                        raise DoesNotFit(f"{what} was killed (SIGKILL): the system most likely ran out of memory",
                                         hint="free memory, then run again")
                    raise OrionError(f"{what} crashed ({name})", hint="run 'orion convert' on the folder to see why")
                log.seek(0)
                last = next((line for line in reversed(log.read().splitlines()) if line.strip()), "")
                raise OrionError(f"{what} failed (exit {proc.returncode})" + (f": {last[:300]}" if last else ""),
                                 hint="run 'orion convert' on the folder to see why")
        finally:
            channel.close()
        result.seek(0)
        doc = json.loads(result.read().strip().splitlines()[-1])
    return ConvertResult(Path(doc["path"]), doc["target"], doc["tensors"], doc["parameters"], doc["size_bytes"],
                         doc["pooling"])


def _child(argv: list[str]) -> int:
    """In the child of :func:`convert_bert_apart`: convert, print the result as JSON; an error goes to
    the parent's channel with its class."""
    from ._proc import ERROR_FD_VAR, report_error
    from .errors import OrionError, from_os_error

    channel = os.environ.pop(ERROR_FD_VAR, "")
    try:
        r = convert_bert(Path(argv[0]), Path(argv[1]), argv[2])
    except OSError as exc:  # a full disk, a permission: as the command line would say it
        report_error(from_os_error(exc), channel)
        return 1
    except OrionError as exc:
        report_error(exc, channel)
        return 1
    print(json.dumps({"path": str(r.path), "target": r.target, "tensors": r.tensors, "parameters": r.parameters,
                      "size_bytes": r.size_bytes, "pooling": r.pooling}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m orion_cli.convert FOLDER OUT f32|f16|bf16|q8_0", file=sys.stderr)
        sys.exit(2)
    sys.exit(_child(sys.argv[1:]))
