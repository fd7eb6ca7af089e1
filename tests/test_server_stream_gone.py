"""A streaming client gone in the middle under ASGI 2.4 (``send`` raises; Starlette never closes the
body), with the server's event loop running on: the worker stops at its next token and the model is
given back at once, not after max_tokens (the response's end sets the worker's cancel)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from test_server_inprocess import call_json, make_state  # noqa: F401 (make_state: a fixture)


def test_a_client_gone_mid_stream_under_asgi_2_4_stops_the_worker(make_state, gemma_q4):
    state, app = make_state()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)  # the server's loop: it goes on
    runner.start()
    sent: list = []
    raised: list = []  # kept, as an error reporter keeps what it is about to send
    body = json.dumps({"model": str(gemma_q4), "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1000,
                       "stream": True}).encode()

    async def go():
        chunks = 0
        inbox = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if inbox:
                return inbox.pop(0)
            await asyncio.Event().wait()  # no disconnect message: ASGI 2.4 tells it by send raising

        async def send(message):
            nonlocal chunks
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                chunks += 1
                if chunks > 2:
                    raise OSError("the client is gone")

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        try:
            await app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - what a server would log
            raised.append(exc)

    try:
        asyncio.run_coroutine_threadsafe(go(), loop).result(timeout=120)
        gone_at = time.monotonic()
        while True:  # poll /api/orion/ps with a deadline: the worker lets go at its next token
            models = [m for m in call_json(app, "GET", "/api/orion/ps")["models"] if m["file"] == str(gemma_q4.absolute())]
            if models and not models[0]["in_use"] and models[0]["queue_depth"] == 0:
                break
            assert time.monotonic() - gone_at < 10, f"the gone client's worker still decodes: {models} {raised} {sent[:3]}"
        steps = state.manager.peek(models[0]["key"]).decode_steps
        assert steps < 200, steps  # it stopped long before the ~1,000 tokens it was allowed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
