"""The dashboard without a browser: its files come from the package and go out with a strict CSP, its script
never parses the server's text as HTML, and what it shows is in the document ``orion ps`` reads
(``/api/orion/ps``: the machine, each model's placement, requests and speed), beside the memory history's
bounded ring (an injected clock) and the event stream's replay (``?since=``).

The page in a real browser: tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from test_server_inprocess import call, call_json

STATIC = Path(__file__).resolve().parent.parent / "orion_cli" / "server" / "static"
GiB = 2**30


@pytest.fixture
def make_state(monkeypatch):
    """``make_state(**kwargs)``: a ServerState and its app (``api_key``: the app's); closed after."""
    from orion_cli.server.app import create_app
    from orion_cli.server.state import ServerState
    from orion_cli.strategy import load_strategy

    made = []

    def make(api_key=None, strategy=None, **kwargs):
        state = ServerState(strategy or load_strategy({}), **kwargs)
        made.append(state)
        return state, create_app(state, api_key=api_key)

    yield make
    for state in made:
        state.close()


# ---------------------------------------------------------------- the files


def test_the_files_are_read_from_the_installed_package():
    """Served from importlib.resources (what a wheel holds: pyproject's package-data), not the repo's tree;
    test_packaging checks the wheel has them."""
    from importlib.resources import files

    from orion_cli.server.dashboard import FILES, static_file

    assert set(FILES) == {p.name for p in STATIC.iterdir()}
    for name in FILES:
        assert static_file(name) == files("orion_cli.server").joinpath("static", name).read_bytes()
    assert static_file("../app.py") is None and static_file("static/index.html") is None


@pytest.mark.parametrize("path, kind", [("/", "text/html"), ("/dashboard", "text/html"),
                                        ("/dashboard/dashboard.js", "text/javascript"),
                                        ("/dashboard/dashboard.css", "text/css"),
                                        ("/dashboard/favicon.svg", "image/svg+xml")])
def test_each_file_goes_out_with_a_strict_csp_and_without_the_key(make_state, path, kind):
    state, app = make_state(api_key="s3cret")
    status, headers, body = call(app, "GET", path)
    assert status == 200 and headers["content-type"].startswith(kind) and body
    csp = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


def test_the_data_needs_the_key_and_health_says_so(make_state):
    state, app = make_state(api_key="s3cret")
    assert call(app, "GET", "/api/orion/history")[0] == 401
    assert call(app, "GET", "/api/orion/ps")[0] == 401
    assert json.loads(call(app, "GET", "/health")[2])["auth"] is True
    state, app = make_state()
    assert json.loads(call(app, "GET", "/health")[2])["auth"] is False


def test_an_unknown_file_is_a_json_404(make_state):
    state, app = make_state()
    for path in ("/dashboard/app.py", "/dashboard/..%2Fapp.py", "/dashboard/static", "/dashboard/index.htm"):
        status, headers, body = call(app, "GET", path)
        assert status == 404 and headers["content-type"] == "application/json", path
        assert json.loads(body)["error"]["code"] == "not_found"


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/dashboard/dashboard.js" defer>']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    for text in (html, (STATIC / "dashboard.css").read_text(), (STATIC / "dashboard.js").read_text()):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
        assert "@import" not in text and "url(" not in text


def test_the_script_never_parses_text_as_html_nor_puts_the_key_in_a_url():
    js = (STATIC / "dashboard.js").read_text()
    code = "\n".join(line for line in js.splitlines() if not line.strip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"on", "DOMParser", "createContextualFragment", "EventSource", "localStorage"):
        assert sink not in code, sink
    assert code.count("state.key") and re.search(r'Authorization = "Bearer " \+ state\.key', code)
    urls = re.findall(r'api\("([^"]*)"', code) + re.findall(r'fetch\("([^"]*)"', code)
    assert urls and not any("key" in u for u in urls), urls


# ---------------------------------------------------------------- the one document


def test_ps_has_the_machine_and_what_each_model_answered(make_state):
    """The machine from the state's memory probe: the RAM bar's parts add up, the pressure lines are there."""
    from orion_cli.device import MemoryNow

    state, app = make_state(memory=lambda: MemoryNow(16 * GiB, 6 * GiB, "cgroup v2 limit"), gpus=lambda: ())
    doc = call_json(app, "GET", "/api/orion/ps")
    ram = doc["machine"]["ram"]
    assert ram == {"limit_bytes": 16 * GiB, "in_use_bytes": 6 * GiB, "source": "cgroup v2 limit", "orion_bytes": 0,
                   "others_bytes": 6 * GiB, "budget_bytes": state.strategy.memory_budget_bytes}
    assert doc["used_bytes"] == ram["orion_bytes"] and doc["budget_bytes"] == ram["budget_bytes"]
    assert doc["pressure"] == {"level": "normal", "ratio": 0.375, "high": state.strategy.pressure_high,
                               "critical": state.strategy.pressure_critical}
    assert doc["machine"]["gpus"] == [] and doc["machine"]["rpc_servers"] == []


def _status(name: str, estimate: dict, measured: dict, placement: str = ""):
    from orion_cli.ledger import ModelMemory
    from orion_cli.manager_types import ManagerStatus

    memory = ModelMemory(estimate, measured)
    return ManagerStatus(name, name, estimate["ram"], 0.0, False, False, memory=memory, budget_bytes=memory.ram_bytes,
                         placement=placement)


def test_the_machine_counts_each_models_measure_else_its_estimate_on_each_device():
    from orion_cli.device import GPUInfo, MemoryNow
    from orion_cli.rpc import MEASURED, ServerMemory
    from orion_cli.rpc_endpoints import parse_rpc_servers
    from orion_cli.server.machine import machine_document, memory_sample
    from orion_cli.strategy import load_strategy
    from orion_cli.units import parse_size

    strategy = replace(load_strategy({}), rpc_servers=("127.0.0.1:50091", "127.0.0.1:50092=2GB"))
    statuses = [_status("a", {"ram": 1 * GiB, "gpu0": 3 * GiB, "rpc:127.0.0.1:50091": GiB // 2},
                        {"ram": 1 * GiB + 5, "gpu0": 3 * GiB + 7}),
                _status("b", {"ram": 2 * GiB, "gpu1": 1 * GiB}, {})]
    gpus = (GPUInfo(0, "H200", 140 * GiB, 130 * GiB), GPUInfo(1, "H200", 140 * GiB, 100 * GiB))
    (server, _) = parse_rpc_servers(strategy.rpc_servers)
    MEASURED.forget()
    try:
        doc = machine_document(strategy, MemoryNow(64 * GiB, 10 * GiB, "physical RAM"), gpus, statuses, [90 * GiB])
        assert doc["ram"]["orion_bytes"] == 3 * GiB + 5 and doc["ram"]["others_bytes"] == 7 * GiB - 5
        g0, g1 = doc["gpus"]
        assert (g0["used_bytes"], g0["orion_bytes"], g0["others_bytes"], g0["budget_bytes"]) == (
            10 * GiB, 3 * GiB + 7, 7 * GiB - 7, 90 * GiB)
        assert (g1["orion_bytes"], g1["others_bytes"], g1["budget_bytes"]) == (1 * GiB, 39 * GiB, None)
        # never asked: no budget and no devices (the dashboard asks no RPC server); =SIZE is a budget all the same
        r0, r1 = doc["rpc_servers"]
        assert r0 == {"endpoint": "127.0.0.1:50091", "budget_bytes": None, "orion_bytes": GiB // 2, "devices": None}
        assert r1["budget_bytes"] == parse_size("2GB") and r1["orion_bytes"] == 0
        MEASURED.get(server.endpoint, lambda: ServerMemory(server, (3, 0, 0), ((8 * GiB, 8 * GiB),)))
        (r0, _) = machine_document(strategy, MemoryNow(64 * GiB, 10 * GiB, "physical RAM"), gpus, statuses,
                                   [])["rpc_servers"]
        assert r0["budget_bytes"] == int(8 * GiB * strategy.pressure_high) and r0["devices"][0]["total_bytes"] == 8 * GiB
        assert memory_sample(doc) == {"ram_in_use_bytes": 10 * GiB, "ram_orion_bytes": 3 * GiB + 5, "gpus": [
            {"index": 0, "used_bytes": 10 * GiB, "orion_bytes": 3 * GiB + 7},
            {"index": 1, "used_bytes": 40 * GiB, "orion_bytes": 1 * GiB}]}
    finally:
        MEASURED.forget()


def test_the_cli_shows_the_numbers_of_the_same_document(make_state):
    """``orion ps`` (and --watch, which redraws the same view) renders /api/orion/ps: the machine's lines
    carry the figures the page's bars are drawn from."""
    from rich.console import Console

    from orion_cli.cli.serve import _ps_view
    from orion_cli.device import MemoryNow
    from orion_cli.units import format_bytes

    state, app = make_state(memory=lambda: MemoryNow(16 * GiB, 6 * GiB, "cgroup v2 limit"), gpus=lambda: ())
    doc = call_json(app, "GET", "/api/orion/ps")
    console = Console(width=100, record=True, color_system=None)
    console.print(_ps_view(doc))
    text = console.export_text()
    ram = doc["machine"]["ram"]
    assert (f"RAM    {format_bytes(ram['in_use_bytes'])} of {format_bytes(ram['limit_bytes'])} in use (cgroup v2 "
            f"limit): models {format_bytes(ram['orion_bytes'])}, others {format_bytes(ram['others_bytes'])}") in text


# ---------------------------------------------------------------- the memory history


def test_the_history_is_a_bounded_ring_stamped_by_its_clock():
    from orion_cli.server.machine import MemoryHistory

    now = [1000.0]
    readings = iter(range(100))
    history = MemoryHistory(lambda: {"ram_in_use_bytes": next(readings)}, interval_s=2.0, keep=5,
                            clock=lambda: now[0])
    for _ in range(8):
        history.sample()
        now[0] += 2.0
    doc = history.document()
    assert doc["interval_s"] == 2.0 and doc["keep"] == 5
    assert [s["at"] for s in doc["samples"]] == [1006.0, 1008.0, 1010.0, 1012.0, 1014.0]
    assert [s["ram_in_use_bytes"] for s in doc["samples"]] == [3, 4, 5, 6, 7]


def test_the_sampler_samples_at_once_and_stops_with_its_event_and_says_a_failing_probe_once():
    from orion_cli.server.machine import MemoryHistory

    said: list[str] = []
    calls = []

    def read():
        calls.append(1)
        raise OSError("no /proc here")

    stop = threading.Event()
    stop.set()  # run() samples once, then sees it set: it returns
    MemoryHistory(read, on_error=said.append).run(stop)
    assert calls == [1] and len(said) == 1 and "OSError: no /proc here" in said[0]


def test_the_states_history_samples_the_machine_document(make_state):
    from orion_cli.device import MemoryNow

    now = [50.0]
    state, app = make_state(memory=lambda: MemoryNow(16 * GiB, 6 * GiB, "physical RAM"), gpus=lambda: (),
                            clock=lambda: now[0])
    state.history.sample()
    now[0] = 52.5
    state.history.sample()
    doc = call_json(app, "GET", "/api/orion/history")
    assert doc["samples"] == [{"at": 50.0, "ram_in_use_bytes": 6 * GiB, "ram_orion_bytes": 0, "gpus": []},
                              {"at": 52.5, "ram_in_use_bytes": 6 * GiB, "ram_orion_bytes": 0, "gpus": []}]


# ---------------------------------------------------------------- the event stream's replay


def test_events_are_numbered_and_replayed_after_the_last_one_seen():
    from orion_cli.manager import Event
    from orion_cli.server.events import EventLog

    log = EventLog(keep=3)
    for i in range(5):
        log(Event("loaded", f"m{i}", f"m{i} loaded"))

    async def take(since):
        queue = log.subscribe(since)
        got = []
        while not queue.empty():  # the replay is in the queue at once
            got.append(queue.get_nowait())
        log(Event("unloaded", "live", "live one"))  # pushed through the loop, as from a worker thread
        got.append(await asyncio.wait_for(queue.get(), 10))
        assert queue.empty()
        log.unsubscribe(queue)
        return got

    assert [d["seq"] for d in asyncio.run(take(0))] == [3, 4, 5, 6]  # the 3 kept, then the live one
    assert [d["seq"] for d in asyncio.run(take(6))] == [7]  # nothing seen twice
    assert [d["seq"] for d in asyncio.run(take(None))] == [8]  # no replay: from now on
    assert [d["model"] for d in log.latest] == ["live", "live", "live"]
