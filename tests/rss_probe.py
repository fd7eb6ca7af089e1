"""Measure the resident-memory growth of loading a GGUF with llama.cpp and filling its context.

Run as a child process (the measurement must not share a heap with pytest):
    python tests/rss_probe.py MODEL.gguf N_CTX
prints one JSON line: {"n_ctx", "prompt_tokens", "load_bytes", "peak_bytes"}: growth of VmRSS
after loading and of VmHWM (peak) after evaluating a prompt that fills the context, both
relative to VmRSS before loading. Settings are orion's for this machine's engine verdict
(orion_cli.engine.settings_for): llama-cpp-python's own Llama, never outside them.
"""

import json
import sys


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    path, n_ctx = sys.argv[1], int(sys.argv[2])
    from orion_cli.engine import current_check, peer_llama, settings_for

    check = current_check()
    s = settings_for(check)
    import llama_cpp  # noqa: F401  (the library's own start-up is not the model's memory)

    before = status("VmRSS")
    llm = peer_llama(path, check=check, n_ctx=n_ctx, n_batch=s.n_ubatch, n_ubatch=s.n_ubatch,
                     swa_full=s.swa_full, flash_attn=s.flash_attn, n_threads=2, verbose=False)
    loaded = status("VmRSS")
    text = ("The history of the city of Paris is long and rich. " * (n_ctx // 8)).encode()
    tokens = llm.tokenize(text)[: n_ctx - 8]
    llm.eval(tokens)
    peak = status("VmHWM")
    print(json.dumps({"n_ctx": n_ctx, "prompt_tokens": len(tokens), "load_bytes": loaded - before,
                      "peak_bytes": peak - before}))


if __name__ == "__main__":
    main()
