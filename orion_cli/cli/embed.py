"""``orion embed``, ``orion search`` and ``orion collections``: a local semantic index."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import LocalOpt, json_option
from ._output import escape, examples, out

EMBED_EXAMPLES = examples(
    ("orion embed notes/ --collection notes", "embed every text file under notes/"),
    ("orion embed notes/ --collection notes", "again: only new and changed chunks"),
    ("cat lines.txt | orion embed - --jsonl", "one JSON object with an embedding per line"),
    ("orion embed src/ -c code --model ./my-bert", "another encoder (name, repo, folder, GGUF)"),
)
SEARCH_EXAMPLES = examples(
    ("orion search 'how do I retry a request' -c notes", "the 5 best chunks"),
    ("orion search 'sqlite locking' -c code -n 10 --json", "for scripts"),
)
COLLECTIONS_EXAMPLES = examples(
    ("orion collections", "every collection with its model, files and chunks"),
    ("orion collections notes", "one collection"),
    ("orion collections notes --rm", "delete it"),
)


def _store():
    from ..paths import orion_home
    from ..store import EmbeddingStore

    return EmbeddingStore(orion_home() / "embeddings.db")


class _NoProgress:
    """What a progress bar does where nobody watches (a pipe, a file): nothing, and no Rich import."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None


def _progress():
    from ._output import err_console

    if not err_console().is_terminal:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}", markup=False), TimeRemainingColumn(), console=err_console())


def _collection_model(name: str) -> str | None:
    """The encoder id an existing collection was made with (None for a new one)."""
    store = _store()
    try:
        return next((c.model_id for c in store.collections() if c.name == name), None)
    finally:
        store.close()


def _encoder_source(model: str | None, collection_model: str | None = None, *, local: bool = False):
    """Who encodes: the running 'orion serve', else this process (the server layer decides)."""
    from ..server.remote import EncoderSource

    return EncoderSource(model, collection_model, local=local, notice=out.notice)


@json_option("Print the summary as JSON.")
def embed(
    paths: Annotated[list[str], typer.Argument(help="Files or folders to embed; '-' reads texts from stdin.")],
    collection: Annotated[Optional[str], typer.Option("--collection", "-c", help="The collection to add to (made on first use).", metavar="NAME")] = None,
    model: Annotated[Optional[str], typer.Option(help="The encoder: a name (default minilm), org/repo, a folder or a GGUF.", metavar="MODEL")] = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="With '-': write one JSON object per input line, with its embedding.")] = False,
    hidden: Annotated[bool, typer.Option("--hidden", help="Include hidden files and folders.")] = False,
    local: LocalOpt = False,
) -> None:
    """Embed text files into a collection: chunks of at most the model's window, float16 vectors.

    Folders are walked honouring .gitignore; hidden, binary and unreadable files
    are skipped and counted. Re-running embeds only new or changed chunks and
    drops deleted files; a run stopped half-way keeps every file it committed
    (many files a transaction, at least every second), each whole.
    """
    from ..errors import InvalidValue, NotFound

    if paths == ["-"]:
        return _embed_stdin(model, jsonl, local)
    if jsonl:
        raise InvalidValue("--jsonl goes with '-' (texts from stdin)", hint="orion embed - --jsonl < lines.txt")
    if not collection:
        raise InvalidValue("which collection?", hint="add --collection NAME")
    if any(not p.strip() for p in paths):  # Path("") is the current folder: never embed it by accident
        raise InvalidValue("an empty path was given", hint="name the files or folders to embed ('.' for this folder)")
    from .._text import clip
    from ..models import PATH_HINT, on_disk, user_path

    targets = [user_path(p, hint=PATH_HINT) for p in paths]  # ~user for a user not here: NotFound
    missing = [p for p in targets if not on_disk(p)]  # a name too long for a file names none
    if missing:
        raise NotFound(f"no such file or folder: {clip(missing[0], 200)}", hint="check the path")

    from ..indexer import embed_paths

    source = _encoder_source(model, _collection_model(collection), local=local)
    model_id = source.model_id
    store = _store()
    import time

    progress = _progress()
    state = {"task": None, "done": 0}
    start = time.perf_counter()

    def on_file(path: Path, n: int) -> None:
        if state["task"] is None:
            state["task"] = progress.add_task("embedding", total=None, rate="")
        progress.update(state["task"], description=f"{path.name[:40]}")

    def on_chunks(n: int) -> None:
        state["done"] += n
        rate = state["done"] / max(time.perf_counter() - start, 1e-9)
        progress.update(state["task"], completed=state["done"], rate=f"{rate:.1f} chunks/s")

    try:
        with progress:
            summary = embed_paths(store, source.make, collection, targets, model_id=model_id, dim=source.dim,
                                  hidden=hidden, on_file=on_file, on_chunks=on_chunks)
        elapsed = time.perf_counter() - start
    finally:
        store.close()
        source.close()
    if summary.files_seen == 0 and not out.json:
        w = summary.walk
        raise NotFound(f"no text file to embed in {', '.join(paths)}",
                       hint=f"skipped: {w.hidden} hidden, {w.ignored} ignored, {w.binary} binary, "
                            f"{w.unreadable} unreadable (--hidden includes hidden files)")

    def human() -> None:
        from ._output import err_console

        w = summary.walk
        rate = summary.chunks_embedded / elapsed if elapsed and summary.chunks_embedded else 0.0
        out.text(f"[bold]{escape(collection)}[/]: {summary.files_embedded} file(s) embedded ({summary.chunks_embedded} chunks, "
                 f"{rate:.1f} chunks/s; {summary.chunks_reused} reused), {summary.files_unchanged} unchanged, "
                 f"{summary.files_dropped} dropped, {summary.files_failed} failed in {elapsed:.1f} s")
        skipped = f"{w.hidden} hidden, {w.ignored} ignored, {w.binary} binary, {w.unreadable} unreadable"
        if w.loops:
            skipped += f", {w.loops} symlink loop(s)"
        out.text(f"[dim]skipped: {skipped}[/]")
        for failure in summary.failures[:5]:
            err_console().print(f"[yellow]failed[/] {escape(failure)}", markup=True)
        if profile:
            out.text("[dim]profile (s): " + ", ".join(f"{k} {v:.2f}" for k, v in profile.items()) + "[/]")

    import os

    # ORION_EMBED_PROFILE=1: where the time went, each stage's busy seconds (orion_cli.indexer.Profile)
    profile = summary.profile if os.environ.get("ORION_EMBED_PROFILE") == "1" else None
    out.result(summary.to_dict() | {"collection": collection, "model": model_id, "seconds": round(elapsed, 3),
                                    "encoded_by": source.via} | ({"profile": profile} if profile else {}), human)


def _embed_stdin(model: str | None, jsonl: bool, local: bool) -> None:
    import json

    from ..errors import InvalidValue

    if not jsonl:
        raise InvalidValue("'-' reads texts from stdin and writes JSON lines", hint="add --jsonl")
    lines = [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in lines if t.strip()]
    source = _encoder_source(model, local=local)
    model_id = source.model_id
    try:
        vectors = source.make().encode(texts) if texts else []
    finally:
        source.close()
    stdout = sys.stdout
    for text, vec in zip(texts, vectors):
        stdout.write(json.dumps({"text": text, "model": model_id, "embedding": [round(float(x), 7) for x in vec]}) + "\n")


@json_option("Print the results as JSON.")
def search(
    query: Annotated[str, typer.Argument(help="What to look for, in words.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="The collection to search.", metavar="NAME")],
    n: Annotated[int, typer.Option("-n", help="How many results.", metavar="K")] = 5,
    model: Annotated[Optional[str], typer.Option(help="The encoder the collection was made with (default minilm).", metavar="MODEL")] = None,
    local: LocalOpt = False,
) -> None:
    """Search a collection: the chunks closest in meaning to QUERY, with file, lines and score."""
    from ..errors import InvalidValue
    from ..store import search as do_search

    if n < 1:
        raise InvalidValue(f"-n {n} must be at least 1", hint="for example -n 5")
    if not query.strip():
        raise InvalidValue("an empty query was given", hint="say in words what to look for")
    store = _store()
    try:
        c = store.collection(collection)
        source = _encoder_source(model, c.model_id, local=local)
        try:
            if source.model_id != c.model_id:
                raise InvalidValue(f"collection {collection!r} was made with {c.model_id}, not {source.model_id}",
                                   hint="pass the same --model as when embedding")
            q = source.make().encode([query])[0]
        finally:
            source.close()
        results = do_search(store, c, q, n)
    finally:
        store.close()

    def human() -> None:
        if not results:
            out.text(escape(f"{collection} is empty: 'orion embed PATH --collection {collection}'"))
        for score, r in results:
            out.text(f"[bold]{score:.3f}[/]  {escape(r.path or '?')}:{r.start_line}-{r.end_line}")
            snippet = " ".join(r.text.split())[:200]
            out.text(f"       [dim]{escape(snippet)}[/]")

    out.result({"query": query, "collection": collection, "results": [
        {"score": round(score, 4), "path": r.path, "start_line": r.start_line, "end_line": r.end_line,
         "text": r.text} for score, r in results]}, human)


@json_option("Print as JSON.")
def collections(
    name: Annotated[Optional[str], typer.Argument(help="One collection to show.")] = None,
    rm: Annotated[bool, typer.Option("--rm", help="Delete the named collection.")] = False,
) -> None:
    """List the collections (model, files, chunks, vector bytes); show or delete one."""
    from ..errors import InvalidValue

    store = _store()
    try:
        if rm:
            if not name:
                raise InvalidValue("--rm needs a collection name", hint="orion collections NAME --rm")
            store.drop(name)
            out.result({"deleted": name}, lambda: f"Deleted collection [bold]{escape(name)}[/].")
            return
        items = [store.stats(store.collection(name))] if name else [store.stats(c) for c in store.collections()]
    finally:
        store.close()

    def human() -> str | None:
        from ..units import format_bytes

        if not items:
            return "No collections yet: 'orion embed PATH --collection NAME'."
        out.table(["name", "model", "dim", "files", "chunks", "vectors", "created"],
                  [(i["name"], i["model"], i["dim"], i["files"], i["chunks"], format_bytes(i["vector_bytes"]),
                    i["created"]) for i in items])
        return None

    out.result({"collections": items}, human)
