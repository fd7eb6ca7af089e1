"""RPC server lists as users write them (``host:port[=SIZE],…``), the error for a build without RPC,
and the RPC timeouts read from the environment.

A leaf: the strategy parses ``rpc_servers`` with it, the engine raises :func:`rpc_unsupported`,
and neither needs the protocol probe (``orion_cli.rpc``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import ConfigError, OrionError
from .units import format_bytes, parse_size

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class RpcServer:
    """One ``host:port[=SIZE]`` of ``--rpc``."""

    host: str
    port: int
    budget_bytes: int | None = None  # =SIZE: what orion may put there (else from its free memory)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.endpoint + (f"={format_bytes(self.budget_bytes)}" if self.budget_bytes is not None else "")


def parse_rpc_servers(value: str | Iterable[str] | None) -> tuple[RpcServer, ...]:
    """``host:port[=SIZE],…`` (or a list of those) as servers; ValueError saying what is expected."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    servers: list[RpcServer] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("host:port[=SIZE] entries, comma-separated (127.0.0.1:50052,box:50052=6GB)")
        text = item.strip()
        if not text:
            raise ValueError("host:port[=SIZE] entries, comma-separated, none empty")
        address, eq, size = text.partition("=")
        host, colon, port_text = address.strip().rpartition(":")
        host = host.strip().strip("[]")
        if not colon or not host or not port_text.strip().isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"host:port[=SIZE] entries (127.0.0.1:50052,box:50052=6GB); {text!r} has no valid "
                             f"host and port")
        budget = None
        if eq:
            try:
                budget = parse_size(size.strip())
            except OrionError:
                raise ValueError(f"host:port=SIZE with a size like 6GB; {text!r} has {size.strip()!r}") from None
        server = RpcServer(host, int(port_text), budget)
        if any(s.endpoint == server.endpoint for s in servers):
            raise ValueError(f"each server once; {server.endpoint} is given twice")
        servers.append(server)
    return tuple(servers)


def format_rpc_servers(servers: Sequence[RpcServer]) -> list[str]:
    """The strategy's form of a server list (``host:port`` or ``host:port=BYTES``), parsed back alike."""
    return [s.endpoint + (f"={s.budget_bytes}" if s.budget_bytes is not None else "") for s in servers]


class RpcUnsupported(OrionError):
    """This llama.cpp was built without the RPC backend."""


def rpc_unsupported() -> RpcUnsupported:
    from .enginebuild import rebuild_command

    return RpcUnsupported("this llama.cpp was built without its RPC backend (-DGGML_RPC=ON)",
                          hint=f"'{rebuild_command()}' (or 'make engine') rebuilds it with RPC")


class RpcServerFailed(OrionError):
    """``orion rpc-server`` could not start or stopped on its own."""


def seconds_from_env(var: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A number of seconds above 0 from an environment variable (``default`` when unset or empty);
    anything else is one configuration error naming the variable."""
    text = (os.environ if environ is None else environ).get(var, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:  # nan, inf, 0 and negatives fail here
        raise ConfigError(f"{var}={text!r} is not valid", hint="expected a number of seconds above 0 (at most "
                          f"86400), such as {default:g}, or unset it")
    return value
