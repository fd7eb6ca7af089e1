"""The quality record: how far each model file (at a KV-cache type) is from its reference, as
``orion eval --kld`` measured it on this machine, beside the memory ledger.

One JSON file, ``$ORION_HOME/quality.json``, holds the newest :data:`KEEP` records, written whole
under a lock as the memory ledger is (:class:`~orion_cli.ledger.MemoryLedger`'s rules: a corrupt file
is ignored and overwritten by the next record). A record is keyed by the file's identity and the KV
type: :func:`file_key`, computed from the GGUF header alone (architecture, name, parameters, type,
weight bytes, tensors), so a file on the Hub, read with range requests by ``fetch --auto``, finds the
record of the same file measured here.

Before any measurement, :func:`typical_kld` gives the mean KLD published for a quantization type:
llama.cpp's LLaMA 3 8B scoreboard (``tools/perplexity/README.md`` in the vendored llama.cpp; no
importance matrix, the IQ types with a WikiText one). Small models lose more to a type than an 8B
one, so a measured record, when there is one, always wins; the source is named wherever a figure is
shown.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

KEEP = 1024  # records kept (the newest)
MAX_FILE_BYTES = 16 * 2**20
PUBLISHED_SOURCE = "typical for its type: llama.cpp's LLaMA 3 8B scoreboard (tools/perplexity/README.md)"

# Mean KLD against the model's BF16 original, llama.cpp's LLaMA 3 8B scoreboard (rows without an
# importance matrix; the IQ types only exist with one, WikiText 10m tokens).
PUBLISHED_KLD = {
    "F32": 0.0, "BF16": 0.0, "F16": 0.000551, "Q8_0": 0.001355, "Q6_K": 0.005452, "Q5_K_M": 0.010762,
    "Q5_K_S": 0.016595, "Q5_1": 0.018045, "Q5_0": 0.022239, "Q4_K_M": 0.031273, "Q4_K_S": 0.043136,
    "IQ4_NL": 0.035742, "IQ4_XS": 0.036334, "Q4_1": 0.071683, "Q4_0": 0.071940, "Q3_K_L": 0.087176,
    "Q3_K_M": 0.101913, "IQ3_M": 0.102534, "IQ3_S": 0.111278, "IQ3_XS": 0.138693, "IQ3_XXS": 0.183625,
    "Q3_K_S": 0.228217, "IQ2_M": 0.325989, "IQ2_S": 0.439197, "Q2_K": 0.445132, "IQ2_XS": 0.546290,
    "IQ2_XXS": 0.812022, "IQ1_M": 1.393084, "IQ1_S": 2.211278,
}


def file_key(header) -> str:
    """A model file's identity from its GGUF header: the same for the file on the Hub (its header read
    remotely) and the file here. Its metadata is in it (an importance-matrix quant names its matrix
    there, so it is not its plain sibling); the weights are not read: two files differing only in
    their weights' values share a key."""
    tensors = [(t.name, t.ggml_type, list(t.shape)) for t in header.tensors]
    metadata = sorted((k, repr(v)) for k, v in header.metadata.items())
    doc = [header.architecture, header.n_params, header.file_type, header.tensor_bytes, tensors, metadata]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:32]


def typical_kld(file_type: str) -> float | None:
    """The mean KLD published for a quantization type (None: not in the table)."""
    return PUBLISHED_KLD.get(file_type.upper())


@dataclass(frozen=True)
class QualityRecord:
    key: str  # file_key of the file
    kv_type: str
    file: str
    file_type: str
    flash_attn: bool
    kld_mean: float
    kld_err: float
    kld_p99: float
    same_top: float  # a share, 0..1
    delta_perplexity: float
    reference: str  # the reference file's name
    reference_type: str
    text: str  # the text's file name
    text_sha256: str
    n_ctx: int
    positions: int  # scored positions
    at: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QualityRecord":
        """A record read back, checked: a value of the wrong type, a KLD that is negative or not
        finite, a share outside 0..1 raise TypeError (the record is then skipped)."""
        out = {}
        for f in fields(cls):
            v = d[f.name]
            want = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[f.type]
            if not isinstance(v, want) or (f.type != "bool" and isinstance(v, bool)):
                raise TypeError(f"{f.name}: {v!r}")
            if f.type == "float":
                try:
                    v = float(v)
                except OverflowError:
                    raise TypeError(f"{f.name}: too large") from None
                if not math.isfinite(v) or (f.name != "delta_perplexity" and v < 0):
                    raise TypeError(f"{f.name}: {v!r}")
            if f.type == "str" and ("\n" in v or len(v) > 4096):
                raise TypeError(f"{f.name}: not one line")
            out[f.name] = v
        if out["same_top"] > 1:
            raise TypeError(f"same_top: {out['same_top']!r}")
        return cls(**out)

    def describe(self) -> str:
        """Where the figure comes from, for a table's note: ``measured here against F16 on TEXT, DATE``."""
        return (f"measured here against {self.reference_type} ({self.reference}) on {self.text}, "
                f"{self.positions} positions, {self.at[:10]}")


def default_path() -> Path:
    from .paths import orion_home

    return orion_home() / "quality.json"


class QualityBook:
    """The records of one quality file (default ``$ORION_HOME/quality.json``)."""

    def __init__(self, path: Path | None = None, *, keep: int = KEEP) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.keep = keep
        self._lock = threading.Lock()

    def get(self, key: str, kv_type: str = "f16") -> QualityRecord | None:
        return self._read().get((key, kv_type))

    def for_header(self, header, kv_type: str = "f16") -> QualityRecord | None:
        return self.get(file_key(header), kv_type)

    def records(self) -> list[QualityRecord]:
        """Every record, the oldest first."""
        return list(self._read().values())

    def put(self, record: QualityRecord) -> QualityRecord:
        """Record a measurement (replacing the file's previous one at that KV type). Raises TypeError
        for a record :meth:`QualityRecord.from_dict` would not read back, OSError (or InvalidValue,
        where the path is a folder) when the file cannot be written."""
        from ._fs import write_text_atomic
        from .ledger import MemoryLedger

        record = QualityRecord.from_dict(record.to_dict())
        with self._lock, MemoryLedger(self.path)._file_lock():
            records = self._read()
            records.pop((record.key, record.kv_type), None)
            records[(record.key, record.kv_type)] = record
            while len(records) > self.keep:
                records.pop(next(iter(records)))
            doc = {"version": 1, "records": [r.to_dict() for r in records.values()]}
            write_text_atomic(self.path, json.dumps(doc, indent=1) + "\n")
        return record

    def _read(self) -> dict[tuple[str, str], QualityRecord]:
        """The records by (key, KV type); none where the file is missing, no regular file (a FIFO, a
        device), larger than orion writes, or not JSON; a bad record is skipped, the others stay."""
        try:
            if not self.path.is_file() or self.path.stat().st_size > MAX_FILE_BYTES:
                return {}
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # (nesting deeper than the parser goes)
            return {}
        rows = doc.get("records") if isinstance(doc, dict) else None
        out: dict[tuple[str, str], QualityRecord] = {}
        for row in rows if isinstance(rows, list) else ():
            try:
                r = QualityRecord.from_dict(row)
            except (KeyError, TypeError, AttributeError, ValueError):  # one bad record: the others stay
                continue
            out.pop((r.key, r.kv_type), None)
            out[(r.key, r.kv_type)] = r
        return out


@dataclass(frozen=True)
class Quality:
    """A file's KLD as a choice sees it: measured here, or typical for its type, or unknown."""

    kld: float | None
    source: str  # "measured" | "typical" | "unknown"
    record: QualityRecord | None = None
    kv_type: str = "f16"  # the KV-cache type asked for
    kv_measured: bool = True  # whether the figure is at that KV type (typical figures are at f16)

    @property
    def label(self) -> str:
        """For a table cell: ``0.0065`` measured, ``~0.031`` typical, ``?`` unknown."""
        if self.kld is None:
            return "?"
        text = f"{self.kld:.4f}" if self.kld < 10 else f"{self.kld:.1f}"
        return text if self.source == "measured" and self.kv_measured else "~" + text

    @property
    def note(self) -> str:
        note = (self.record.describe() if self.record is not None else
                PUBLISHED_SOURCE if self.source == "typical" else "no measurement, no published figure for its type")
        if not self.kv_measured and self.kld is not None:
            note += f"; with an f16 KV cache: a {self.kv_type} cache's own loss is not in it"
        return note

    def to_dict(self) -> dict:
        return {"kld": self.kld, "source": self.source, "kv_type": self.kv_type, "at_kv_type": self.kv_measured,
                "measured": self.record.to_dict() if self.record is not None else None, "note": self.note}


def quality_of(header, kv_type: str = "f16", book: QualityBook | None = None) -> Quality:
    """The file's mean KLD: its record here at that KV type, else the published figure for its type."""
    from .estimate import ENCODER_ARCHITECTURES

    if header.architecture in ENCODER_ARCHITECTURES:  # vectors, not next-token distributions
        return Quality(None, "unknown")
    book = book or QualityBook()
    record = book.for_header(header, kv_type)
    if record is not None:
        return Quality(record.kld_mean, "measured", record, kv_type)
    # no measurement at that KV type: the weights' own figure (measured with an f16 cache, else typical),
    # said to leave the cache's loss out
    record = book.for_header(header, "f16") if kv_type != "f16" else None
    if record is not None:
        return Quality(record.kld_mean, "measured", record, kv_type, kv_measured=False)
    typical = typical_kld(header.file_type)
    return Quality(typical, "typical" if typical is not None else "unknown", None, kv_type,
                   kv_measured=kv_type == "f16")


def record_results(results, reference: dict, text_file: Path, text_name: str, book: QualityBook | None = None,
                   *, now: str | None = None) -> list[QualityRecord | None]:
    """Record each of ``orion eval --kld``'s results (:class:`~orion_cli.kld.KLDResult`) against
    ``reference`` (its summary, with ``path``), measured on ``text_file``: the records, in order (None
    for a result not recorded: a figure that is not finite). Raises OSError or InvalidValue when the
    file cannot be written."""
    from ._fs import now_iso
    from .gguf_header import read_local_header

    def line(text: str) -> str:
        return " ".join(text.split())[:1024]

    book = book or QualityBook()
    sha = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    ref_path = Path(reference["path"])
    ref_type = read_local_header(ref_path).file_type
    at = now or now_iso()
    out: list[QualityRecord | None] = []
    for r in results:
        if not all(math.isfinite(x) for x in (r.kld_mean, r.kld_err, r.kld_p99, r.same_top, r.delta_perplexity)):
            out.append(None)  # (a diverging model's NaN is in the table, not a record fetch would choose by)
            continue
        header = read_local_header(Path(r.path))
        out.append(book.put(QualityRecord(
            file_key(header), r.kv_type, line(Path(r.path).name), r.file_type, bool(r.flash_attn), r.kld_mean,
            r.kld_err, r.kld_p99, r.same_top, r.delta_perplexity, line(ref_path.name), ref_type, line(text_name),
            sha, r.n_ctx, r.scored_tokens, at)))
    return out


KV_BY_QUALITY = ("f16", "q8_0", "q4_0")  # K and V alike, the closest to the reference first


def kv_type_for(header, strategy, book: QualityBook | None = None) -> tuple[tuple[str, str], str]:
    """The KV-cache type a model loads with under the strategy's quality bound, and why (empty: the
    strategy's own). Only a tier's default is changed (a type set by a flag, a variable or the file
    is the user's choice): the tiers short of memory quantize the cache, and where ``orion eval --kld
    --kv-type`` measured that type above ``max_kld`` for this file, the next finer type measured under
    it (f16, the reference's own, always is) is taken instead. An unmeasured type stands: nothing says
    it is over the bound."""
    kv = strategy.kv_type
    bound = getattr(strategy, "max_kld", None)
    if bound is None or kv[0] != kv[1] or kv[0] not in KV_BY_QUALITY or not _tier_default_kv(strategy):
        return kv, ""
    from .estimate import ENCODER_ARCHITECTURES

    if header.architecture in ENCODER_ARCHITECTURES:
        return kv, ""
    book = book or QualityBook()
    key = file_key(header)
    record = book.get(key, kv[0])
    if record is None or record.kld_mean <= bound:
        return kv, ""
    finer = KV_BY_QUALITY[: KV_BY_QUALITY.index(kv[0])]
    for t in reversed(finer):  # the most compact of the finer types that is under the bound
        r = book.get(key, t)
        if t == "f16" or (r is not None and r.kld_mean <= bound):
            return (t, t), (f"KV cache {t}, not the tier's {kv[0]}: {kv[0]} measured KLD {record.kld_mean:.4f} for "
                            f"{record.file}, above max_kld {bound:g}")
    return kv, ""


def _tier_default_kv(strategy) -> bool:
    """Whether the strategy's KV type is its tier's default: from the tier, or from a strategy file
    that holds the tier's own value (``orion profile`` writes every setting); not one a flag or a
    variable set, nor a file's other value."""
    source = strategy.sources.get("kv_type")
    if source == "tier":
        return True
    if source != "file":
        return False
    from .tiers import builtin_tiers

    try:
        return builtin_tiers().get(strategy.tier).kv_type == strategy.kv_type
    except Exception:  # noqa: BLE001 - a tier table that lacks it: the file's value is the user's
        return False
