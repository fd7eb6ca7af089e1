"""What the server says about itself: request counters (:class:`Metrics`), ``GET /api/orion/ps``
(:func:`ps_document`: the one document ``orion ps`` and the dashboard both show) and ``GET /metrics``
(:func:`metrics_text`, Prometheus text format).

Each loaded model's memory is shown on each device (``ram``, ``gpu0``..., ``rpc:HOST:PORT``): the
estimate, what its load measured, and the error ``(estimate - measured) / measured`` (a signed
fraction: -0.022 is an estimate 2.2 % short)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import ServerState


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # [sum, count]
        self.tokens: dict[tuple[str, str], int] = {}  # (model, "in"|"out")
        self.served: dict[str, int] = {}  # model -> requests it answered (generations, embeddings)
        self.speed: dict[str, float] = {}  # model -> tokens a second of its last request

    def request(self, route: str, model: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, model, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            acc = self.latency.setdefault((route, model), [0.0, 0])
            acc[0] += seconds
            acc[1] += 1

    def add_tokens(self, model: str, n_in: int, n_out: int, tok_s: float | None = None) -> None:
        """One request a model answered: its tokens in and out, and ``tok_s``, its speed (a
        generation's tokens a second; an embedding's tokens embedded a second, its wait included)."""
        with self._lock:
            for direction, n in (("in", n_in), ("out", n_out)):
                self.tokens[(model, direction)] = self.tokens.get((model, direction), 0) + n
            self.served[model] = self.served.get(model, 0) + 1
            if tok_s is not None:
                self.speed[model] = tok_s

    def of_model(self, model: str) -> dict:
        """``requests`` a model answered, its ``tokens_in``/``tokens_out`` and ``last_tok_s`` (None: none yet)."""
        with self._lock:
            speed = self.speed.get(model)
            return {"requests": self.served.get(model, 0), "tokens_in": self.tokens.get((model, "in"), 0),
                    "tokens_out": self.tokens.get((model, "out"), 0),
                    "last_tok_s": None if speed is None else round(speed, 1)}

    def render(self, *, queues: dict[str, int], memory: dict[str, int], events: dict[str, int],
               decode_steps: dict[str, int] | None = None,
               devices: dict[tuple[str, str], tuple[int, int | None]] | None = None) -> str:
        """``devices``: (model, device) -> (estimate, measured or None) of each loaded model."""
        def esc(text: str) -> str:
            return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")

        lines = ["# HELP orion_requests_total Requests answered, by route, model and status.",
                 "# TYPE orion_requests_total counter"]
        with self._lock:
            for (route, model, status), n in sorted(self.requests.items()):
                lines.append(f'orion_requests_total{{route="{esc(route)}",model="{esc(model)}",status="{status}"}} {n}')
            lines += ["# HELP orion_request_seconds Time to answer, by route and model.",
                      "# TYPE orion_request_seconds summary"]
            for (route, model), (total, count) in sorted(self.latency.items()):
                labels = f'route="{esc(route)}",model="{esc(model)}"'
                lines.append(f"orion_request_seconds_sum{{{labels}}} {total:.6f}")
                lines.append(f"orion_request_seconds_count{{{labels}}} {count}")
            lines += ["# HELP orion_tokens_total Tokens in (prompts, inputs) and out (generated).",
                      "# TYPE orion_tokens_total counter"]
            for (model, direction), n in sorted(self.tokens.items()):
                lines.append(f'orion_tokens_total{{model="{esc(model)}",direction="{direction}"}} {n}')
        lines += ["# HELP orion_queue_depth Requests running or waiting, by model.", "# TYPE orion_queue_depth gauge"]
        lines += [f'orion_queue_depth{{model="{esc(m)}"}} {n}' for m, n in sorted(queues.items())]
        lines += ["# HELP orion_model_memory_bytes Estimated memory of each loaded model.",
                  "# TYPE orion_model_memory_bytes gauge"]
        lines += [f'orion_model_memory_bytes{{model="{esc(m)}"}} {n}' for m, n in sorted(memory.items())]
        devices = devices or {}
        lines += ["# HELP orion_model_memory_estimate_bytes Each loaded model's memory estimate, by device.",
                  "# TYPE orion_model_memory_estimate_bytes gauge"]
        lines += [f'orion_model_memory_estimate_bytes{{model="{esc(m)}",device="{esc(d)}"}} {est}'
                  for (m, d), (est, _) in sorted(devices.items())]
        lines += ["# HELP orion_model_memory_measured_bytes What each loaded model's load measured, by device.",
                  "# TYPE orion_model_memory_measured_bytes gauge"]
        lines += [f'orion_model_memory_measured_bytes{{model="{esc(m)}",device="{esc(d)}"}} {got}'
                  for (m, d), (_, got) in sorted(devices.items()) if got is not None]
        lines += ["# HELP orion_decode_steps_total llama_decode calls of each loaded model's decoder (since it loaded);",
                  "# several chat requests share one step.", "# TYPE orion_decode_steps_total counter"]
        lines += [f'orion_decode_steps_total{{model="{esc(m)}"}} {n}' for m, n in sorted((decode_steps or {}).items())]
        lines += ["# HELP orion_model_events_total Model manager events (loaded, evicted, unloaded...).",
                  "# TYPE orion_model_events_total counter"]
        lines += [f'orion_model_events_total{{kind="{k}"}} {n}' for k, n in sorted(events.items())]
        return "\n".join(lines) + "\n"


def memory_rows(status) -> list[dict]:
    """A loaded model's memory on each device: ``device``, ``estimate_bytes``, ``measured_bytes``
    (None: not measured) and ``error`` (``(estimate - measured) / measured``, None without a measure)."""
    from ..ledger import error_of, shown_devices

    rows = []
    memory = status.memory
    for device in shown_devices(memory.estimate, memory.measured):
        estimate, measured = memory.estimate.get(device, 0), memory.measured.get(device)
        error = error_of(estimate, measured)
        rows.append({"device": device, "estimate_bytes": estimate, "measured_bytes": measured,
                     "error": None if error is None else round(error, 4)})
    return rows


def ps_document(state: "ServerState") -> dict:
    """What ``GET /api/orion/ps`` answers, and so ``orion ps`` and the dashboard show: each loaded model,
    memory against the budget, pressure (from the state's memory probe: a container's limit, not the
    host's RAM) with its two lines, the machine (:func:`.machine.machine_document`: RAM, each GPU, the
    RPC servers), the latest events. ``used_bytes`` is what the manager counts: each model's measured RAM
    once it has one, else its estimate (the machine's ``ram.orion_bytes``)."""
    from ..budget import pressure_of
    from .machine import machine_document

    depths = state.queue_depths()
    statuses = state.manager.status()
    memory = state.memory()
    strategy = state.strategy
    machine = machine_document(strategy, memory, state.gpus(), statuses, state.gpu_budgets())
    models = []
    for s in statuses:
        served = state.by_key(s.key)
        model = state.manager.peek(s.key)
        counted = state.metrics.of_model((served.model_id if served.kind == "encoder" else served.name)
                                         if served else s.name)
        models.append({
            "name": served.name if served else s.name, "key": s.key, "kind": served.kind if served else "",
            "file": str(served.path) if served else "", "type": served.file_type if served else "",
            "model_id": served.model_id if served else "",
            "estimate_bytes": s.estimate_bytes, "measured_bytes": s.memory.measured.get("ram"),
            "budget_bytes": s.budget_bytes, "estimate_source": s.memory.source,
            "estimate_figures": s.memory.figures, "memory": memory_rows(s),
            "gpu_bytes": s.gpu_bytes,
            "remote_bytes": s.remote_bytes,
            "placement": s.placement or "all layers on the CPU",
            "loaded_for_s": round(s.loaded_for_s, 1), "idle_s": round(s.idle_s, 1),
            "keep_alive_s": s.keep_alive_s,
            "expires_in_s": None if s.expires_in_s is None else round(s.expires_in_s, 1),
            "pinned": s.pinned, "in_use": s.in_use, "users": s.users, "queue_depth": depths.get(s.key, 0),
            # its runner process (None: loaded in the server's own) and that process's resident memory now
            "runner_pid": getattr(model, "pid", None) or None, "rss_bytes": getattr(model, "rss_bytes", None),
            **counted,  # requests answered, tokens in and out, last_tok_s
        })
    pressure = pressure_of(memory, strategy.pressure_high, strategy.pressure_critical)
    return {"models": models, "budget_bytes": strategy.memory_budget_bytes, "used_bytes": machine["ram"]["orion_bytes"],
            "gpu_budget_bytes": state.manager.gpu_budget_bytes,
            "gpu_used_bytes": sum(s.memory.gpu_bytes for s in statuses),
            "max_models": strategy.max_models,
            "pressure": pressure | {"high": strategy.pressure_high, "critical": strategy.pressure_critical},
            "machine": machine, "events": list(state.events.latest)[-10:]}


def metrics_text(state: "ServerState") -> str:
    """``GET /metrics``: the counters, each model's queue depth, memory and decode steps, the events."""
    queues = {}
    for key, depth in state.queue_depths().items():
        served = state.by_key(key)
        queues[served.name if served else key] = depth
    memory, steps, devices = {}, {}, {}
    for status in state.manager.status():
        served = state.by_key(status.key)
        name = served.name if served else status.name
        memory[name] = status.estimate_bytes
        for row in memory_rows(status):
            devices[(name, row["device"])] = (row["estimate_bytes"], row["measured_bytes"])
        if served is not None and served.kind == "llm":
            model = state.manager.peek(status.key)
            steps[name] = model.decode_steps if model is not None else 0
    return state.metrics.render(queues=queues, memory=memory, events=dict(state.events.counts), decode_steps=steps,
                                devices=devices)
