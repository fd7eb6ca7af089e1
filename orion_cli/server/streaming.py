"""Server-sent event streams whose work runs in a thread, holding a :class:`~.scheduler.Lease`,
and whole answers whose work stops when their client leaves (:func:`run_until_gone`).

The lease is given back however the client leaves: after the last event; when it goes away in the
middle (the worker stops at its next token, then lets go); or when it went away before the first
byte, where Starlette cancels the response before it iterates the body, so the body's own clean-up
never runs: :class:`LeasedStream` lets go in its ASGI call's ``finally``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from .scheduler import Lease

T = TypeVar("T")


async def run_until_gone(work: Callable[[], T], receive, cancel: threading.Event) -> T:
    """``work()`` in a worker thread, its result (or its error) once it ends, while ``receive`` (the
    request's ASGI receive, its body already read) is watched for ``http.disconnect``: a client that
    goes away sets ``cancel`` (the worker stops at its next token and gives its model back on its
    own) and this raises :class:`ClientDisconnect` at once. Cancelled itself, it sets ``cancel`` too.
    Without it a gone client's whole answer was generated, to ``max_tokens``, on a share of the
    model's context (and a stopping server waited for it)."""
    from anyio import to_thread

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    done = asyncio.ensure_future(to_thread.run_sync(work))
    done.add_done_callback(_seen)  # an error nobody waits for any more is not logged as lost
    watcher = asyncio.ensure_future(gone())
    watcher.add_done_callback(_seen)
    try:
        await asyncio.wait({done, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # not waited for: a worker inside a model that is being unloaded ends with it
            cancel.set()
            raise ClientDisconnect()
        return done.result()
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        watcher.cancel()


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def stream_from_thread(work: Callable[[Callable[[Any], None], threading.Event], None],
                             lease: Lease | None = None, cancel: threading.Event | None = None) -> AsyncIterator[Any]:
    """Run ``work(emit, cancel)`` in a thread and yield what it emits; a client that goes away sets
    ``cancel`` (here, or the response's, which ends even where its body is never closed). The thread
    holds ``lease`` until it ends (the model is not given back under it)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = cancel if cancel is not None else threading.Event()
    done = object()

    def emit(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: no one reads any more
            cancel.set()

    def run() -> None:
        try:
            work(emit, cancel)
        except BaseException as exc:  # the stream has started: an error event, then the end
            emit(exc)
        finally:
            if lease is not None:
                lease.release()
        emit(done)

    if lease is not None:
        lease.hold()
    try:
        threading.Thread(target=run, name="orion-stream", daemon=True).start()
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            yield item
    finally:
        cancel.set()


class LeasedStream(StreamingResponse):
    """A streaming response that lets go of its lease once its ASGI call ends, whichever way."""

    def __init__(self, lease: Lease, content, *, cancel: threading.Event | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.lease = lease
        self.cancel = cancel  # the worker's: set when the call ends (under ASGI 2.4 a gone client's body is
        # never closed, and the worker would decode to max_tokens)
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.lease.release()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.cancel is not None:
                self.cancel.set()
            self.release()
