"""The shared encoder, its hot cache, and turning files into chunks.

- :class:`Encoder`: tokenization as the HF tokenizer does it (checked against it in tests),
  truncation at the model's window keeping ``[SEP]``, one sequence per llama.cpp decode
  (fastest measured here), mean pooling by llama.cpp, L2 normalisation.
- :class:`HotCache`: the design notes' hybrid LFU+LRU cache for texts already embedded in
  this process: capacity 200, TTL 1 h, on overflow evict the 20 % with the lowest
  access-count / age score. The clock is injected.
- chunks (:mod:`.chunks`): :meth:`Encoder.chunks_and_sequences` cuts a text with this
  model's token counts, and gives each chunk's tokens.
- :func:`walk`: the files under some paths, honouring ``.gitignore``, skipping hidden,
  binary and unreadable files and never following a symlink loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from .chunks import DEFAULT_MAX_TOKENS, NOT_WORDPIECE_SPACE, Chunk, chunk_spans, make_chunks

# ---------------------------------------------------------------- hot cache


@dataclass
class _CacheEntry:
    value: object
    created: float
    hits: int = 1


class HotCache:
    """Hybrid LFU+LRU cache: on overflow the 20 % with the lowest hits / age go."""

    def __init__(self, capacity: int = 200, ttl_s: float = 3600.0, evict_fraction: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.evict_fraction = evict_fraction
        self._clock = clock
        self._entries: dict[str, _CacheEntry] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str):
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or now - entry.created > self.ttl_s:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        entry.hits += 1
        self.hits += 1
        return entry.value

    def put(self, key: str, value) -> None:
        now = self._clock()
        if key not in self._entries and len(self._entries) >= self.capacity:
            self._evict(now)
        self._entries[key] = _CacheEntry(value, now)

    def _evict(self, now: float) -> None:
        expired = [k for k, e in self._entries.items() if now - e.created > self.ttl_s]
        for k in expired:
            del self._entries[k]
        if len(self._entries) < self.capacity:
            return
        n = max(1, int(len(self._entries) * self.evict_fraction))
        score = {k: e.hits / max(now - e.created, 1e-9) for k, e in self._entries.items()}
        for k in sorted(score, key=score.__getitem__)[:n]:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries


# ---------------------------------------------------------------- encoder


def truncate(ids: list[int], window: int) -> list[int]:
    """Token ids cut at ``window`` as sentence-transformers cuts them: the last one ([SEP]) kept."""
    return ids if len(ids) <= window else ids[: window - 1] + [ids[-1]]


def normalise(vectors):
    """A float matrix's rows scaled to unit length (L2), in place; returned."""
    import numpy as np

    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


class Encoder:
    """Texts to L2-normalised vectors with a loaded embedding model."""

    def __init__(self, model, *, model_id: str, max_tokens: int = DEFAULT_MAX_TOKENS,
                 cache: HotCache | None = None) -> None:
        self.model = model
        self.model_id = model_id
        self.max_tokens = max_tokens
        self.cache = cache if cache is not None else HotCache()
        self.dim = model.n_embd

    def tokenize(self, text: str) -> list[int]:
        """[CLS] tokens [SEP], truncated at the window as sentence-transformers does."""
        return truncate(self.model.tokenize(text), self.max_tokens)

    def count_tokens(self, text: str) -> int:
        """Word pieces of ``text`` without the special tokens."""
        return max(0, len(self.model.tokenize(text)) - 2)

    def encode_f16(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None) -> list[bytes]:
        """Each text's vector as float16 bytes, as the store keeps them."""
        import numpy as np

        return [row.tobytes() for row in self.encode(texts, on_done=on_done).astype(np.float16)]

    def chunks(self, text: str) -> list[Chunk]:
        """``text`` cut into chunks that fit this encoder's window."""
        return self.chunks_and_sequences(text, sequences=False)[0]

    @property
    def tokens_add_up(self) -> bool:
        """Whether a text's word pieces are its lines' pieces end to end: WordPiece (BERT's tokenizer,
        ``tokenizer.ggml.model`` "bert") cuts at whitespace before anything else, and a line ends with
        one. The chunker's line counts then give each chunk's tokens: nothing is tokenised twice."""
        header = getattr(self.model, "header", None)
        return header is not None and header.get("tokenizer.ggml.model") == "bert"

    def chunks_and_sequences(self, text: str, *, sequences: bool = True) -> tuple[list[Chunk], list[list[int]]]:
        """:meth:`chunks` and each chunk's :meth:`sequences` (every line's tokens asked at once: the
        model may be in a runner process, where each question is a message; where
        :attr:`tokens_add_up`, the chunks' tokens are put together from the lines')."""
        lines = list(dict.fromkeys(line for line in text.splitlines(keepends=True) if line.strip()))
        ids = dict(zip(lines, self.model.tokenize_many(lines))) if lines else {}

        def count(piece: str) -> int:
            got = ids.get(piece)
            return max(0, len(got) - 2) if got is not None else self.count_tokens(piece)

        pieces, spans = chunk_spans(text, count, self.max_tokens - 2)
        chunks = make_chunks(pieces, spans)
        if not sequences:
            return chunks, []
        # Python ends lines (and re's \s matches) at the separators \x1c-\x1f, which WordPiece drops
        if not (ids and self.tokens_add_up) or any(c in text for c in NOT_WORDPIECE_SPACE):
            return chunks, self.sequences([c.text for c in chunks])
        first = next(iter(ids.values()))
        cls, sep = first[:1], first[-1:]  # [CLS] and [SEP]
        cut = [p[0] for p in pieces if p[0].strip() and p[0] not in ids]  # parts of long lines
        ids.update(zip(cut, self.model.tokenize_many(cut)) if cut else ())
        out = []
        for i, j in spans:
            body = [t for p in pieces[i:j] if p[0].strip() for t in ids[p[0]][1:-1]]
            out.append(truncate(cls + body + sep, self.max_tokens))
        return chunks, out

    @property
    def batch_size(self) -> int:
        """Sequences a call of :meth:`encode_sequences_f16` should get: every context of the pool busy
        for 16 decodes between joins."""
        return 16 * self.model.n_contexts * self.model.spec.settings.embed_pack

    def sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`tokenize` of each text, asked at once (the model may be in a runner process)."""
        return [truncate(ids, self.max_tokens) for ids in self.model.tokenize_many(list(texts))] if texts else []

    def encode_sequences_f16(self, sequences: Sequence[Sequence[int]]) -> list[bytes]:
        """The float16 vectors (as the store keeps them) of token sequences from :meth:`sequences`, in
        order, not cached: ``orion embed``'s pipeline tokenises ahead of the encoder and sends it batches
        drawn across files. Safe to call from several threads at once (the pool shares its contexts)."""
        import numpy as np

        if not sequences:
            return []
        vectors = normalise(self.model.embed_tokens(sequences)).astype(np.float16)
        return [row.tobytes() for row in vectors]

    def encode(self, texts: Sequence[str], on_done: Callable[[int], None] | None = None):
        """A float32 matrix, one normalised row per text (cached texts are not embedded again)."""
        import numpy as np

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        for i, text in enumerate(texts):
            hit = self.cache.get(text)
            if hit is not None:
                out[i] = hit
            else:
                todo.append(i)
        if not todo:
            return out
        from concurrent.futures import ThreadPoolExecutor

        step = self.batch_size
        parts = [todo[start: start + step] for start in range(0, len(todo), step)]
        # the next part is tokenised while this one is embedded (on a GPU the tokenizer, one thread,
        # took 40 % of the time the encoder did)
        with ThreadPoolExecutor(1, thread_name_prefix="orion-tokenize") as ahead:
            upcoming = ahead.submit(self.sequences, [texts[i] for i in parts[0]])
            for k, part in enumerate(parts):
                sequences = upcoming.result()
                if k + 1 < len(parts):
                    upcoming = ahead.submit(self.sequences, [texts[i] for i in parts[k + 1]])
                vecs = normalise(self.model.embed_tokens(sequences))
                for i, v in zip(part, vecs):
                    out[i] = v
                    self.cache.put(texts[i], v)
                if on_done:
                    on_done(len(part))
        return out


# ---------------------------------------------------------------- the encoder's type

# The GGUF types orion converts an encoder to by default, and the least cosine a type's vectors
# must keep to the F32 conversion's on the probe texts to be chosen (Q8_0 measured 0.9994 to
# sentence-transformers' own vectors, BF16 0.99997, F16 0.999998: tests/test_convert.py).
ENCODER_TYPES = ("f16", "bf16", "q8_0")
QUALITY_FLOOR = 0.999


@dataclass(frozen=True)
class EncoderType:
    """The type an encoder is converted to on this machine, and why."""

    name: str  # "f16", "bf16" or "q8_0"
    reason: str


def choose_encoder_type(amx: bool, measured: Mapping[str, Mapping[str, float]] | None = None, *,
                        gpu: bool = False, bf16: bool = False) -> EncoderType:
    """The encoder's type here: on a GPU, F16; else the fastest type that keeps the quality floor,
    measured on this machine's CPU by ``orion profile --bench``; before any measurement, Q8_0 where
    ggml's AMX kernels run (int8 tiles), BF16 where the CPU multiplies bfloat16 itself (``bf16``: the
    avx512_bf16 flag; ggml's BF16 dot product), and F16 elsewhere, as measured on each kind of CPU
    (docs/benchmarks.md)."""
    if gpu:
        return EncoderType("f16", "the encoder runs on the GPU: F16 there was faster than Q8_0 (an H200: 2,139 "
                                  "against 2,095 chunks/s) and closer to F32")
    good = {t: m for t, m in (measured or {}).items()
            if t in ENCODER_TYPES and m.get("chunks_s") and m.get("min_cosine", 0.0) >= QUALITY_FLOOR}
    if good:
        best = max(good, key=lambda t: good[t]["chunks_s"])
        figures = ", ".join(f"{t.upper()} {m['chunks_s']:.1f}" for t, m in sorted((measured or {}).items()))
        return EncoderType(best, f"measured here by 'orion profile --bench': {figures} chunks/s; "
                                 f"{best.upper()} keeps cosine {good[best]['min_cosine']:.4f} to F32")
    if amx:
        return EncoderType("q8_0", "ggml's AMX kernels are on here: Q8_0 runs on int8 tiles, faster than F16")
    if bf16:
        return EncoderType("bf16", "this CPU multiplies bfloat16 (avx512_bf16): BF16 ran 1.4x F16 on an AMD EPYC, "
                                   "cosine 0.99997 to F32")
    return EncoderType("f16", "no AMX kernels here: F16 (Q8_0 is no faster without them, and F16 is closer to F32)")


def probe_texts(count: int = 64, max_words: int = 160) -> list[str]:
    """Texts for measuring an encoder: paragraphs of orion's evaluation text (Python's docs)."""
    from .evaluate import default_text

    out, words = [], []
    for word in default_text().split():
        words.append(word)
        if len(words) >= max_words:
            out.append(" ".join(words))
            words = []
            if len(out) == count:
                break
    return out


def measure_encoder_types(folder: Path, work: Path, *, threads: int,
                          texts: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """chunks/s and the least cosine to the F32 conversion of each of ENCODER_TYPES, on this
    machine with the engine's settings (each converted into ``work``)."""
    from .convert import convert_bert_apart
    from .engine import LoadSpec, current_check, load, settings_for

    texts = list(texts or probe_texts())
    settings = settings_for(current_check(), embedding=True)
    # each conversion in a child, and numpy imported only after the loads: this process loads what it
    # converts, llama.cpp's library first (see convert.convert_bert_apart)
    paths = {target: convert_bert_apart(folder, work / f"encoder-{target}.gguf", target).path
             for target in ("f32", *ENCODER_TYPES)}
    vectors, rates = {}, {}
    for target, path in paths.items():
        model = load(LoadSpec(path, DEFAULT_MAX_TOKENS, threads, embedding=True, settings=settings))
        try:
            encoder = Encoder(model, model_id=target)
            encoder.encode(texts[:4])  # warm-up
            encoder.cache = HotCache()  # measure encoding, not the cache
            start = time.perf_counter()
            vectors[target] = encoder.encode(texts)
            rates[target] = len(texts) / (time.perf_counter() - start)
        finally:
            model.close()
    import numpy as np  # after the loads (llama.cpp's library first)

    return {t: {"chunks_s": round(rates[t], 1),
                "min_cosine": round(float(np.min(np.sum(vectors[t] * vectors["f32"], axis=1))), 6)}
            for t in ENCODER_TYPES}


# ---------------------------------------------------------------- files


@dataclass
class WalkReport:
    files: list[Path] = field(default_factory=list)
    hidden: int = 0
    ignored: int = 0
    binary: int = 0
    unreadable: int = 0
    loops: int = 0


def _read_gitignore(folder: Path):
    """The folder's .gitignore as git matches it (pathspec's GitIgnoreSpec: git's wildmatch rules),
    or None."""
    try:
        text = (folder / ".gitignore").read_text(errors="replace")
    except OSError:
        return None
    import pathspec

    spec = pathspec.GitIgnoreSpec.from_lines(text.splitlines())
    return spec if spec.patterns else None


def _ignored(is_dir: bool, stack: list[tuple[Path, object]], path: Path) -> bool:
    """Whether the .gitignore files from the walk's root down to ``path``'s folder ignore it: a
    deeper file's matching rule (a ``!`` one too) overrides the ones above, as in git."""
    ignored = False
    for base, spec in stack:
        try:
            sub = path.relative_to(base).as_posix()
        except ValueError:
            continue
        result = spec.check_file(sub + "/" if is_dir else sub)
        if result.include is not None:
            ignored = result.include
    return ignored


def is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 4  # a character cut at the 8 KiB boundary is fine
    return False


def walk(paths: Sequence[Path], *, hidden: bool = False) -> WalkReport:
    """The text files under ``paths`` (files given directly are taken as they are)."""
    report = WalkReport()
    for _ in iter_walk(paths, report, hidden=hidden):
        pass
    return report


def iter_walk(paths: Sequence[Path], report: WalkReport, *, hidden: bool = False) -> Iterator[Path]:
    """:func:`walk` as it goes: each text file yielded as it is found (and added to ``report.files``),
    the skipped ones counted in ``report``."""
    seen_dirs: set[tuple[int, int]] = set()

    def consider(path: Path) -> Iterator[Path]:
        try:
            if is_binary(path):
                report.binary += 1
                return
        except OSError:
            report.unreadable += 1
            return
        report.files.append(path)
        yield path

    def visit(folder: Path, stack: list) -> Iterator[Path]:
        try:
            st = folder.stat()
        except OSError:
            report.unreadable += 1
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            report.loops += 1
            return
        seen_dirs.add(ident)
        rules = _read_gitignore(folder)
        stack = stack + [(folder, rules)] if rules else stack
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            report.unreadable += 1
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name == ".git":
                continue
            if entry.name.startswith(".") and not hidden:
                report.hidden += 1
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; loops are caught by seen_dirs
            except OSError:
                report.unreadable += 1
                continue
            if _ignored(is_dir, stack, path):
                report.ignored += 1
                continue
            if is_dir:
                yield from visit(path, stack)
            elif entry.is_file():
                yield from consider(path)
            else:
                report.unreadable += 1  # a dangling link, a socket, a device

    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from visit(p, [])
        elif p.is_file():
            yield from consider(p)
