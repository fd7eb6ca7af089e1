"""The memory ledger: what each model really took at its last load, beside its estimate.

After a load the model manager measures what the model holds on each device (:mod:`.measure`) and
records it here, keyed by the model file's header and the settings it loads with
(``Request.ledger_key``). The next load of the same model, after a restart too, takes the recorded
figure as its estimate (:func:`recorded_estimate`).

One JSON file, ``$ORION_HOME/memory-ledger.json``, holds the newest :data:`KEEP` records. It is
written whole (a temporary file, then a rename) under a lock file, so that processes sharing an
``ORION_HOME`` never lose each other's records; a corrupt file is ignored and overwritten by the
next record.

Figures are the model's own: a runner process's interpreter and libraries are not in them (the
manager adds them back for a runner: the resident memory its runner had before the load, as
measured, else ``RUNNER_BASE_BYTES``), so ``orion run`` and ``orion serve`` share records. Devices are
named ``ram``, ``gpu0``, ``gpu1``... (NVML's order, as the placement counts GPUs) and
``rpc:HOST:PORT``. The error of an estimate is ``(estimate - measured) / measured``: negative when
the estimate fell short.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

from .units import format_bytes

KEEP = 512  # records kept (the newest)
MAX_FILE_BYTES = 16 * 2**20  # a bigger file is not one orion wrote: ignored
RAM = "ram"
RECORDED = "measured at its last load"  # a request's estimate_source once the ledger gave its figures
ESTIMATED = "estimate"


def gpu_device(index: int) -> str:
    return f"gpu{index}"


def rpc_device(endpoint: str) -> str:
    return f"rpc:{endpoint}"


def gpu_index(device: str) -> int | None:
    """The index of a ``gpuN`` device (None for any other)."""
    digits = device[3:]
    return int(digits) if device.startswith("gpu") and digits.isdigit() else None


def device_label(device: str) -> str:
    """How a line of text names a device: ``RAM``, ``VRAM on GPU 0``, ``on RPC server HOST:PORT``."""
    if device == RAM:
        return "RAM"
    index = gpu_index(device)
    if index is not None:
        return f"VRAM on GPU {index}"
    return f"on RPC server {device.removeprefix('rpc:')}"


def error_of(estimate: int | None, measured: int | None) -> float | None:
    """``(estimate - measured) / measured``; None where either is unknown or nothing was measured."""
    if estimate is None or not measured:
        return None
    return (estimate - measured) / measured


def estimate_by_device(request) -> dict[str, int]:
    """A manager request's estimate on each device, as the manager counts it (a runner's own memory
    in ``ram``)."""
    devices = {RAM: request.estimate_bytes}
    parts = request.gpu_parts or ((request.gpu_bytes,) if request.gpu_bytes else ())
    for i, b in enumerate(parts):
        if b:
            devices[gpu_device(i)] = b
    for where, b, _ in request.remote:
        devices[rpc_device(where)] = devices.get(rpc_device(where), 0) + b
    return devices


@dataclass(frozen=True)
class Measured:
    """What one load made resident, as a probe measured it.

    ``ram_bytes``: resident growth across the load (None: not measured); ``gpu_bytes``: each GPU's
    VRAM by index (empty: not measured); ``base_bytes``: the memory of the process before the load
    when it is the model's own process (a runner: its interpreter and libraries), None otherwise."""

    ram_bytes: int | None = None
    gpu_bytes: Mapping[int, int] = field(default_factory=dict)
    base_bytes: int | None = None


@dataclass
class ModelMemory:
    """A loaded model's memory on each device as the manager counts it: the estimate, and what its
    load measured (a runner's own memory in both ``ram`` figures); the measure, once there is one, is
    what the budget counts."""

    estimate: dict[str, int]
    measured: dict[str, int] = field(default_factory=dict)
    source: str = ESTIMATED  # where the estimate came from (RECORDED: the ledger)
    base_bytes: int = 0  # the runner's own memory in measured["ram"] (as measured where it was)
    estimate_base_bytes: int = 0  # and in estimate["ram"] (the request's)
    ledger_key: str = ""
    recorded: dict[str, int] | None = None  # the model's own figures the ledger has from this load
    figures: str = "formula"  # an estimate's buffers: "formula" or "llama.cpp dry run" (the request's)

    @classmethod
    def of(cls, request, measured: Measured | None) -> "ModelMemory":
        """A request's estimate and a probe's measure. RAM measured right after a load lacks what only
        a decode makes resident (``request.fill_bytes``, which the estimate is for): it is added, so
        that both are for a full context."""
        memory = cls(estimate_by_device(request), source=request.estimate_source, base_bytes=request.base_bytes,
                     estimate_base_bytes=request.base_bytes, ledger_key=request.ledger_key,
                     figures=getattr(request, "figures", "formula"))
        if measured is None:
            return memory
        if measured.base_bytes is not None:
            memory.base_bytes = measured.base_bytes
        if measured.ram_bytes is not None:
            memory.measured[RAM] = measured.ram_bytes + request.fill_bytes + memory.base_bytes
        memory.measured.update({gpu_device(i): int(b) for i, b in sorted(measured.gpu_bytes.items())})
        return memory

    def copy(self) -> "ModelMemory":
        return replace(self, estimate=dict(self.estimate), measured=dict(self.measured))

    @property
    def ram_bytes(self) -> int:
        return self.measured.get(RAM, self.estimate.get(RAM, 0))

    def on(self, device: str) -> int:
        """Its bytes on ``device`` as the budgets count them: the measure, else the estimate (0: none there)."""
        return self.measured.get(device, self.estimate.get(device, 0))

    @property
    def gpu_bytes(self) -> int:
        both = {**self.estimate, **self.measured}
        return sum(b for d, b in both.items() if gpu_index(d) is not None)

    def observe(self, rss_bytes) -> None:
        """The model's process's resident memory now (a runner's heartbeat): above the measured RAM,
        the measure is raised to it (a decode made resident what the load had not touched)."""
        if RAM in self.measured and isinstance(rss_bytes, int) and rss_bytes > self.measured[RAM]:
            self.measured[RAM] = rss_bytes

    def record(self, name: str, file: str, *, first: bool) -> Record | None:
        """What the ledger should hold now (the model's own figures): after the load (``first``, with
        the estimate unless that came from the ledger), then only when the measure grew; None if
        nothing is to be written."""
        if not self.measured or not self.ledger_key:
            return None
        own = dict(self.measured)
        if RAM in own:
            own[RAM] = max(0, own[RAM] - self.base_bytes)
        if not first and own == self.recorded:
            return None
        estimate = {}
        if first and self.source == ESTIMATED:
            estimate = dict(self.estimate)
            estimate[RAM] = max(0, estimate[RAM] - self.estimate_base_bytes)
        from ._fs import now_iso

        return Record(self.ledger_key, name, file, estimate, own, now_iso(), self.base_bytes or None)


def loading_detail(request) -> str:
    """The ``loading`` event's line: the request's estimate (and where it came from)."""
    detail = f"{request.name}, estimate {format_bytes(request.estimate_bytes)}"
    if request.remote:
        detail += f" here ({request.placement})"
    elif request.gpu_bytes:
        detail += f" RAM + {format_bytes(request.gpu_bytes)} VRAM ({request.placement})"
    if request.estimate_source != ESTIMATED:
        detail += f" ({request.estimate_source})"
    return detail


def describe(name: str, estimate: Mapping[str, int], measured: Mapping[str, int], source: str = ESTIMATED) -> str:
    """One line for the ``loaded`` event: each device's measured figure, its estimate and the error
    ("gemma3-270m: measured 312 MiB RAM, estimate 305 MiB, -2.2 %")."""
    if not measured:
        return name
    parts = []
    for device in shown_devices(estimate, measured):
        est, got = estimate.get(device), measured.get(device)
        label = device_label(device)
        if got is None:
            parts.append(f"estimate {format_bytes(est)} {label} (not measured)")
            continue
        text = f"measured {format_bytes(got)} {label}, estimate {format_bytes(est or 0)}"
        error = error_of(est or 0, got)
        parts.append(text + (f", {error * 100:+.1f} %" if error is not None else ""))
    said = f" ({source})" if source != ESTIMATED else ""
    return f"{name}: " + "; ".join(parts) + said


def shown_devices(estimate: Mapping[str, int], measured: Mapping[str, int]) -> list[str]:
    """The devices worth a line: RAM always, any other where the estimate or the measure is not 0."""
    devices = [RAM] + sorted({d for d in (*estimate, *measured) if d != RAM},
                             key=lambda d: (gpu_index(d) is None, gpu_index(d) or 0, d))
    return [d for d in devices if d == RAM or estimate.get(d) or measured.get(d)]


@dataclass(frozen=True)
class Record:
    """One model's figures: the estimate and what its last load measured, by device (the model's
    own, without a runner's interpreter)."""

    key: str
    name: str
    file: str
    estimate: dict[str, int]
    measured: dict[str, int]
    at: str  # when it was measured: UTC, ISO 8601
    runner_base_bytes: int | None = None  # its runner's resident memory before the load (None: loaded in-process)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        def sizes(value) -> dict[str, int]:
            if not isinstance(value, dict):
                raise TypeError("not a dict")
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) or type(v) is not int or v < 0:
                    raise TypeError(f"{k!r}: {v!r} is not a size")
                out[k] = v
            return out

        texts = [d[k] for k in ("key", "name", "file", "at")]
        if not all(isinstance(t, str) for t in texts) or not d["key"]:
            raise TypeError("a field is not text")
        base = d.get("runner_base_bytes")
        if base is not None and (type(base) is not int or base < 0):
            raise TypeError(f"runner_base_bytes: {base!r} is not a size")
        return cls(d["key"], d["name"], d["file"], sizes(d["estimate"]), sizes(d["measured"]), d["at"], base)


def recorded_estimate(request, record: Record | None):
    """The request with the recorded measured figures as its estimate (RAM and each GPU measured;
    what went to RPC servers stays the estimate's), and ``estimate_source`` saying so; the request
    unchanged without a record."""
    if record is None or not record.measured:
        return request
    changes: dict = {"estimate_source": RECORDED}
    if RAM in record.measured:
        base = record.runner_base_bytes if request.base_bytes and record.runner_base_bytes else request.base_bytes
        changes["estimate_bytes"] = record.measured[RAM] + base
    gpus = {gpu_index(d): b for d, b in record.measured.items() if gpu_index(d) is not None}
    if gpus:
        parts = tuple(gpus.get(i, 0) for i in range(max(gpus) + 1))
        changes.update(gpu_parts=parts, gpu_bytes=sum(parts))
    return replace(request, **changes)


def default_path() -> Path:
    from .paths import orion_home

    return orion_home() / "memory-ledger.json"


class MemoryLedger:
    """The records of one ledger file (``path``; default ``$ORION_HOME/memory-ledger.json``), the
    newest ``keep``."""

    def __init__(self, path: Path | None = None, *, keep: int = KEEP) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.keep = keep
        self._lock = threading.Lock()  # one writer a process (the temporary file's name is the pid's)
        self._seen: tuple[tuple[int, int] | None, dict[str, Record]] = (None, {})

    def get(self, key: str) -> Record | None:
        """The record of ``key`` (None if there is none)."""
        if not key:
            return None
        return self._records().get(key)

    def records(self) -> list[Record]:
        """Every record, the oldest first."""
        return list(self._records().values())

    def put(self, record: Record) -> Record:
        """Record a model's figures (replacing its previous record; an empty ``estimate`` or no
        ``runner_base_bytes`` keeps the previous one's). The oldest records go past ``keep``. Raises OSError (or
        :class:`~orion_cli.errors.InvalidValue` where the path is no regular file) when it cannot be
        written."""
        from ._fs import write_text_atomic

        with self._lock, self._file_lock():
            records = dict(self._records(fresh=True))
            old = records.pop(record.key, None)
            if old is not None:
                record = replace(record, estimate=record.estimate or old.estimate,
                                 runner_base_bytes=record.runner_base_bytes or old.runner_base_bytes)
            records[record.key] = record
            while len(records) > self.keep:
                records.pop(next(iter(records)))
            doc = {"version": 1, "records": [r.to_dict() for r in records.values()]}
            write_text_atomic(self.path, json.dumps(doc, indent=1) + "\n")
            self._seen = (self._stamp(), records)
        return record

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _records(self, *, fresh: bool = False) -> dict[str, Record]:
        """The file's records by key (oldest first), read again only when the file changed; none
        where it is missing, unreadable or corrupt."""
        stamp = self._stamp()
        seen, records = self._seen
        if stamp is not None and stamp == seen and not fresh:
            return records
        records = self._read() if stamp is not None else {}
        self._seen = (stamp, records)
        return records

    def _read(self) -> dict[str, Record]:
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                return {}
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
            return {}
        rows = doc.get("records") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            return {}
        records: dict[str, Record] = {}
        for row in rows:
            try:
                record = Record.from_dict(row)
            except (KeyError, TypeError, AttributeError):  # one bad record: the others stay
                continue
            records.pop(record.key, None)
            records[record.key] = record
        return records

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock beside the file while a process reads, merges and writes it (a no-op
        where ``fcntl`` is missing or the file system has no locks)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock here (some network file systems): the rename still keeps it whole
                pass
            yield
        finally:
            os.close(fd)  # (closing releases the lock)
