"""The server's listening socket and what asyncio does with the connections it accepts: TCP_NODELAY
on each (issue 'a server that lives on', item 10: without it a reply on a kept-alive connection
waited ~40 ms for the client's delayed ACK), and a bounded keep_alive through /api/orion/load."""

from __future__ import annotations

import asyncio
import socket


def test_accepted_connections_have_tcp_nodelay():
    from orion_cli.server import bind

    listener = bind("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets TCP_NODELAY
    seen: list[int] = []

    async def go():
        accepted = asyncio.Event()

        def on_connection(reader, writer):
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
            accepted.set()

        server = await asyncio.start_server(on_connection, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(accepted.wait(), 10)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(go())
    assert seen and seen[0] != 0


def test_a_huge_keep_alive_is_a_400_and_the_server_goes_on(tmp_path, monkeypatch):
    from test_server_inprocess import call, call_json

    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    monkeypatch.setenv("ORION_HOME", str(tmp_path / "home"))
    state = ServerState(load_strategy({}))
    try:
        app = create_app(state)
        status, _, body = call(app, "POST", "/api/orion/load", {"model": "minilm", "keep_alive": 10**320})
        assert status == 400 and b"longer than a year" in body
        assert call_json(app, "GET", "/api/orion/ps")["models"] == []  # /api/orion/ps still answers
        status, _, _ = call(app, "GET", "/metrics")
        assert status == 200
    finally:
        state.close()
