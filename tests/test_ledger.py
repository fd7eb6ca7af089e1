"""The memory ledger: records persisted, bounded and read back (a corrupt file ignored); the manager
measuring each load through an injected probe, budgeting by the measure, and giving the next load of
the same model (same ledger key, also after a restart) the recorded figure as its estimate; the
default probe's arithmetic with injected memory readings; /api/orion/ps, /metrics and `orion ps` on a real
`orion serve`. Nothing here needs a GPU: VRAM comes through the injected probes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from orion_cli import ledger
from orion_cli.ledger import Measured, MemoryLedger, Record
from orion_cli.manager import ModelDoesNotFit, ModelManager, Request
from orion_cli.measure import GPUMemory, LoadProbe, vram_of

from test_manager import FakeModel

MiB = 1024**2


class Probe:
    """A probe that loads and reports the figures set for each model (by request key)."""

    def __init__(self, **figures: Measured):
        self.figures = figures
        self.seen: list[Request] = []

    def __call__(self, request, load):
        self.seen.append(request)
        return load(), self.figures.get(request.key)


def req(name, mib=100, *, gpu=(), fill_mib=0, base_mib=0, key=None, remote=()):
    return Request(key=name, name=name, estimate_bytes=mib * MiB, load=lambda cancel: FakeModel(name),
                   gpu_bytes=sum(gpu) * MiB, gpu_parts=tuple(g * MiB for g in gpu), fill_bytes=fill_mib * MiB,
                   base_bytes=base_mib * MiB, ledger_key=key if key is not None else f"key-{name}", remote=remote)


def manager(tmp_path, probe=None, **kw):
    defaults = dict(max_models=4, budget_bytes=1000 * MiB, keep_alive_s=None, clock=lambda: 1000.0,
                    probe=probe, memory_ledger=MemoryLedger(tmp_path / "memory-ledger.json"))
    defaults.update(kw)
    return ModelManager(**defaults)


def record(key, ram_mib, *, name="m", at="2026-01-01T00:00:00+00:00", **measured):
    return Record(key, name, f"/models/{name}.gguf", {"ram": 2 * ram_mib * MiB}, {"ram": ram_mib * MiB, **measured}, at)


# ---------------------------------------------------------------- the ledger file


def test_a_record_persists_and_a_new_ledger_reads_it(tmp_path):
    path = tmp_path / "home" / "memory-ledger.json"
    first = MemoryLedger(path)
    assert first.get("k1") is None and first.records() == []
    first.put(Record("k1", "gemma3-270m", "/m/gemma.gguf", {"ram": 300 * MiB, "gpu0": 50 * MiB},
                     {"ram": 312 * MiB, "gpu0": 48 * MiB}, "2026-01-01T00:00:00+00:00", 41 * MiB))
    again = MemoryLedger(path)  # another process, or the next start
    got = again.get("k1")
    assert got == first.get("k1") and got.measured == {"ram": 312 * MiB, "gpu0": 48 * MiB}
    assert got.runner_base_bytes == 41 * MiB and got.name == "gemma3-270m" and got.file == "/m/gemma.gguf"
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and [r["key"] for r in doc["records"]] == ["k1"]
    # a later measure without an estimate (a load whose estimate came from the ledger) keeps the first one
    again.put(Record("k1", "gemma3-270m", "/m/gemma.gguf", {}, {"ram": 320 * MiB}, "2026-01-02T00:00:00+00:00"))
    latest = MemoryLedger(path).get("k1")
    assert latest.estimate == {"ram": 300 * MiB, "gpu0": 50 * MiB} and latest.measured == {"ram": 320 * MiB}
    assert latest.runner_base_bytes == 41 * MiB


def test_the_ledger_keeps_the_newest_records(tmp_path):
    book = MemoryLedger(tmp_path / "l.json", keep=3)
    for i in range(5):
        book.put(record(f"k{i}", 100 + i))
    assert [r.key for r in book.records()] == ["k2", "k3", "k4"]
    book.put(record("k2", 200))  # measured again: the newest now
    book.put(record("k5", 300))
    assert [r.key for r in MemoryLedger(tmp_path / "l.json").records()] == ["k4", "k2", "k5"]
    assert book.get("k2").measured["ram"] == 200 * MiB and book.get("k3") is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '{"records": 7}', "\udcff", ""])
def test_a_corrupt_ledger_is_ignored_and_overwritten(tmp_path, text):
    path = tmp_path / "memory-ledger.json"
    path.write_text(text, errors="surrogateescape")
    book = MemoryLedger(path)
    assert book.get("k1") is None and book.records() == []
    book.put(record("k1", 100))
    assert [r.key for r in MemoryLedger(path).records()] == ["k1"]


def test_a_bad_record_is_skipped_and_the_others_kept(tmp_path):
    path = tmp_path / "memory-ledger.json"
    good = record("good", 100).to_dict()
    bad = [{"key": "no-fields"}, dict(good, key="neg", measured={"ram": -1}), dict(good, key=""),
           dict(good, key="text", measured={"ram": "lots"}), dict(good, key="float", measured={"ram": 1.5}), 7]
    path.write_text(json.dumps({"version": 1, "records": [*bad, good]}))
    assert [r.key for r in MemoryLedger(path).records()] == ["good"]


def test_processes_writing_one_ledger_lose_no_record(tmp_path):
    path = tmp_path / "memory-ledger.json"
    code = ("import sys\nfrom orion_cli.ledger import MemoryLedger, Record\nbook = MemoryLedger(sys.argv[1])\n"
            "for i in range(25):\n    book.put(Record(f'{sys.argv[2]}-{i}', 'm', 'f', {'ram': 1}, {'ram': i}, 'now'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in ("a", "b", "c")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    keys = {r.key for r in MemoryLedger(path).records()}
    assert keys == {f"{n}-{i}" for n in "abc" for i in range(25)}


def test_errors_are_signed_fractions_of_the_measure():
    assert ledger.error_of(305 * MiB, 312 * MiB) == pytest.approx(-7 / 312)
    assert ledger.error_of(110, 100) == pytest.approx(0.1)
    assert ledger.error_of(100, None) is None and ledger.error_of(100, 0) is None
    line = ledger.describe("gemma3-270m", {"ram": 305 * MiB, "gpu0": 1024 * MiB},
                           {"ram": 312 * MiB, "gpu0": 1000 * MiB})
    assert line == ("gemma3-270m: measured 312 MiB RAM, estimate 305 MiB, -2.2 %; "
                    "measured 1000 MiB VRAM on GPU 0, estimate 1.0 GiB, +2.4 %")


# ---------------------------------------------------------------- the manager with an injected probe


def test_the_manager_budgets_by_the_measure_once_it_has_one(tmp_path):
    # a's estimate (600 MiB) would not fit beside b (500 MiB) in 1000 MiB; what it measured (300) does
    probe = Probe(a=Measured(ram_bytes=300 * MiB))
    m = manager(tmp_path, probe)
    with m.use(req("a", 600)):
        pass
    (a,) = m.status()
    assert (a.estimate_bytes, a.memory.measured, a.budget_bytes) == (600 * MiB, {"ram": 300 * MiB}, 300 * MiB)
    with m.use(req("b", 500)):
        pass
    assert sorted(s.name for s in m.status()) == ["a", "b"]  # nothing evicted
    assert not [e for e in m.events if e.kind == "evicted"]


def test_a_measure_above_the_estimate_makes_room_that_the_estimate_would_not(tmp_path):
    probe = Probe(a=Measured(ram_bytes=700 * MiB))
    m = manager(tmp_path, probe)
    with m.use(req("a", 300)):
        pass
    with m.use(req("b", 500)):  # 300 + 500 would fit; 700 + 500 does not: a goes
        pass
    assert [s.name for s in m.status()] == ["b"]
    assert [(e.kind, e.key) for e in m.events if e.kind == "evicted"] == [("evicted", "a")]


def test_the_measure_adds_what_a_decode_makes_resident_and_the_runner_s_own(tmp_path):
    """RAM measured right after a load lacks the compute buffers (the request's fill_bytes), and a
    runner's own memory (its base) comes with it; its heartbeat's resident memory raises the figure."""
    probe = Probe(a=Measured(ram_bytes=250 * MiB, base_bytes=44 * MiB))
    m = manager(tmp_path, probe)
    with m.use(req("a", 320, fill_mib=30, base_mib=41)) as model:
        pass
    (a,) = m.status()
    assert a.memory.measured["ram"] == (250 + 30 + 44) * MiB
    assert m.ledger.get("key-a").measured == {"ram": 280 * MiB}  # the model's own: without the runner's
    assert m.ledger.get("key-a").estimate == {"ram": (320 - 41) * MiB}
    assert m.ledger.get("key-a").runner_base_bytes == 44 * MiB

    model.rss_bytes = 300 * MiB  # below the figure: nothing changes
    assert m.status()[0].memory.measured["ram"] == 324 * MiB
    model.rss_bytes = 400 * MiB  # a long decode made more resident than the load + fill
    assert m.status()[0].memory.measured["ram"] == 400 * MiB and m.status()[0].budget_bytes == 400 * MiB
    assert m.unload("a")
    assert m.ledger.get("key-a").measured == {"ram": (400 - 44) * MiB}  # written again at its end


def test_the_loaded_event_names_the_measure_and_the_error(tmp_path):
    m = manager(tmp_path, Probe(a=Measured(ram_bytes=312 * MiB)), gpu_budget_bytes=4096 * MiB)
    with m.use(req("a", 305)):
        pass
    (loaded,) = [e for e in m.events if e.kind == "loaded"]
    assert loaded.detail == "a: measured 312 MiB RAM, estimate 305 MiB, -2.2 %"
    m2 = manager(tmp_path / "2", Probe())  # a probe that measured nothing: the name, as before
    with m2.use(req("b", 100)):
        pass
    assert [e.detail for e in m2.events if e.kind == "loaded"] == ["b"]


def test_the_next_load_of_the_same_model_takes_the_recorded_figure_also_after_a_restart(tmp_path):
    probe = Probe(a=Measured(ram_bytes=300 * MiB, gpu_bytes={0: 700 * MiB, 1: 350 * MiB}))
    m = manager(tmp_path, probe, gpu_budget_bytes=4096 * MiB)
    with m.use(req("a", 600, gpu=(600, 400), base_mib=41)):
        pass
    first = m.status()[0]
    assert first.memory.source == "estimate" and first.memory.gpu_bytes == 1050 * MiB
    assert first.memory.estimate == {"ram": 600 * MiB, "gpu0": 600 * MiB, "gpu1": 400 * MiB}
    m.unload("a")

    with m.use(req("a", 600, gpu=(600, 400), base_mib=41)):  # the same file and settings: the same ledger key
        pass
    again = probe.seen[-1]
    assert again.estimate_bytes == 300 * MiB + 41 * MiB and again.gpu_parts == (700 * MiB, 350 * MiB)
    assert again.gpu_bytes == 1050 * MiB and again.estimate_source == ledger.RECORDED
    status = m.status()[0]
    assert status.memory.source == ledger.RECORDED and status.memory.estimate["ram"] == 341 * MiB
    loading = [e.detail for e in m.events if e.kind == "loading"][-1]
    assert loading.startswith("a, estimate 341 MiB RAM + 1.0 GiB VRAM") and loading.endswith(
        "(measured at its last load)")
    m.close()

    # a restart: a new ledger object on the same file, a new manager
    probe2 = Probe()
    restarted = manager(tmp_path, probe2, gpu_budget_bytes=4096 * MiB)
    with restarted.use(req("a", 600, gpu=(600, 400), base_mib=41)):
        pass
    assert probe2.seen[0].estimate_bytes == 341 * MiB and probe2.seen[0].gpu_parts == (700 * MiB, 350 * MiB)
    # another setting (another key) is estimated anew
    with restarted.use(req("a2", 600, key="other-settings")):
        pass
    assert probe2.seen[-1].estimate_bytes == 600 * MiB and probe2.seen[-1].estimate_source == "estimate"
    # the first estimate stays in the ledger beside the latest measure (the formula's error is kept)
    assert restarted.ledger.get("key-a").estimate == {"ram": 559 * MiB, "gpu0": 600 * MiB, "gpu1": 400 * MiB}


def test_a_recorded_figure_that_does_not_fit_is_refused_before_loading(tmp_path):
    m = manager(tmp_path, Probe())
    m.ledger.put(record("key-big", 1200))
    with pytest.raises(ModelDoesNotFit, match="big needs 1.2 GiB"):
        with m.use(req("big", 400)):  # the formula said 400 MiB; its last load measured 1.2 GiB
            pass


def test_vram_is_budgeted_by_the_measure(tmp_path):
    # the estimate (3000 MiB of VRAM) would not fit beside b's 1500 MiB in a 4 GiB budget; the measure does
    m = manager(tmp_path, Probe(a=Measured(ram_bytes=100 * MiB, gpu_bytes={0: 2000 * MiB})),
                gpu_budget_bytes=4096 * MiB)
    with m.use(req("a", 100, gpu=(3000,))):
        pass
    with m.use(req("b", 100, gpu=(1500,))):
        pass
    assert sorted(s.name for s in m.status()) == ["a", "b"]
    assert sum(s.memory.gpu_bytes for s in m.status()) == 3500 * MiB


def test_rpc_parts_keep_their_estimate(tmp_path):
    m = manager(tmp_path, Probe(a=Measured(ram_bytes=90 * MiB)))
    with m.use(req("a", 100, remote=(("10.0.0.2:50052", 500 * MiB, 2000 * MiB),))):
        pass
    (a,) = m.status()
    assert a.memory.estimate == {"ram": 100 * MiB, "rpc:10.0.0.2:50052": 500 * MiB}
    assert a.memory.measured == {"ram": 90 * MiB}
    assert ledger.shown_devices(a.memory.estimate, a.memory.measured) == ["ram", "rpc:10.0.0.2:50052"]


def test_a_ledger_that_cannot_be_written_warns_and_the_load_goes_on(tmp_path):
    (tmp_path / "memory-ledger.json").mkdir()  # a folder where the file should be
    m = manager(tmp_path, Probe(a=Measured(ram_bytes=90 * MiB)))
    with m.use(req("a", 100)):
        pass
    assert m.status()[0].budget_bytes == 90 * MiB
    (warning,) = [e for e in m.events if e.kind == "warning"]
    assert "memory ledger" in warning.detail and "could not be written" in warning.detail


def test_a_probe_whose_load_fails_leaves_no_model(tmp_path):
    def failing(cancel):
        raise RuntimeError("no such file")

    m = manager(tmp_path, Probe())
    with pytest.raises(RuntimeError):
        with m.use(Request("x", "x", 100 * MiB, failing, ledger_key="key-x")):
            pass
    assert m.status() == [] and m.events[-1].kind == "failed" and m.ledger.records() == []


def test_concurrent_loads_are_each_measured(tmp_path):
    figures = {f"m{i}": Measured(ram_bytes=(10 + i) * MiB) for i in range(6)}
    m = manager(tmp_path, Probe(**figures), max_models=6)
    threads = [threading.Thread(target=lambda n=n: m.load(req(n, 50))) for n in figures]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert {s.name: s.memory.measured["ram"] for s in m.status()} == {n: f.ram_bytes for n, f in figures.items()}
    assert len(m.ledger.records()) == 6


# ---------------------------------------------------------------- the default probe's arithmetic


class RunnerLike(FakeModel):
    """What a RunnerModel reports once loaded: its pid, its RSS before the load and what the load added."""

    def __init__(self, pid, base, growth):
        super().__init__("runner")
        self.pid, self.base_bytes, self.load_growth_bytes = pid, base, growth


def readings(*values):
    it = iter(values)
    return lambda: next(it)


def test_the_probe_takes_a_runner_s_own_figures_and_nvml_s_count_of_its_pid():
    before = GPUMemory({0: 1000 * MiB, 1: 500 * MiB}, {0: {11: 1000 * MiB}, 1: {}})
    after = GPUMemory({0: 1900 * MiB, 1: 800 * MiB}, {0: {11: 1000 * MiB, 4242: 850 * MiB}, 1: {4242: 290 * MiB}})
    probe = LoadProbe(in_process=False, gpu_memory=readings(before, after))
    model, measured = probe(req("a", 100, gpu=(900, 300)), lambda: RunnerLike(4242, 44 * MiB, 250 * MiB))
    assert measured == Measured(ram_bytes=250 * MiB, gpu_bytes={0: 850 * MiB, 1: 290 * MiB}, base_bytes=44 * MiB)
    assert model.pid == 4242


def test_without_a_per_process_count_the_probe_takes_each_gpu_s_growth():
    before = GPUMemory({0: 1000 * MiB})
    after = GPUMemory({0: 1900 * MiB})  # nvidia-smi: no per-process figure
    probe = LoadProbe(in_process=False, gpu_memory=readings(before, after))
    _, measured = probe(req("a", 100, gpu=(900,)), lambda: RunnerLike(4242, 44 * MiB, 250 * MiB))
    assert measured.gpu_bytes == {0: 900 * MiB}
    # NVML that does not list the runner (another pid namespace): the growth too
    assert vram_of(4242, GPUMemory({0: 100}, {0: {}}), GPUMemory({0: 300}, {0: {1: 300}}), growth=False) == {0: 200}
    assert vram_of(4242, None, None, growth=False) == {}


def test_the_in_process_probe_measures_the_growth_of_this_process_one_load_at_a_time():
    import os

    prepared = []
    before = GPUMemory({0: 1000 * MiB}, {0: {os.getpid(): 300 * MiB}})
    after = GPUMemory({0: 1700 * MiB}, {0: {os.getpid(): 1000 * MiB}})
    probe = LoadProbe(in_process=True, prepare=lambda: prepared.append(1), gpu_memory=readings(before, after),
                      rss=readings(500 * MiB, 820 * MiB))
    _, measured = probe(req("a", 100, gpu=(700,)), lambda: FakeModel("a"))
    assert measured == Measured(ram_bytes=320 * MiB, gpu_bytes={0: 700 * MiB})
    # a CPU-only request looks at no GPU; the library was imported once, before the first measure
    probe._rss = readings(800 * MiB, 700 * MiB)
    _, measured = probe(req("b", 100), lambda: FakeModel("b"))
    assert measured == Measured(ram_bytes=0, gpu_bytes={}) and prepared == [1]


def test_a_probe_that_cannot_read_the_gpus_measures_the_rest():
    def broken():
        raise OSError("NVML went away")

    probe = LoadProbe(in_process=False, gpu_memory=broken)
    _, measured = probe(req("a", 100, gpu=(700,)), lambda: RunnerLike(1, 40 * MiB, 200 * MiB))
    assert measured == Measured(ram_bytes=200 * MiB, gpu_bytes={}, base_bytes=40 * MiB)


# ---------------------------------------------------------------- a real server


def test_ps_metrics_and_the_cli_show_estimate_measured_and_error_and_a_restart_reads_the_ledger(
        tmp_path_factory, gemma_q4, engine_check_cache):
    import shutil

    from test_serve import Server, _home

    from orion_cli.engine import RUNNER_BASE_BYTES

    home = _home(tmp_path_factory, gemma_q4, "ledger-home")
    shutil.copy(engine_check_cache, home / "engine-check.json")
    for start in ("first", "restarted"):
        s = Server(home, env={"ORION_CTX": "1024"})
        try:
            assert s.request("POST", "/api/orion/load", {"model": "gemma3-270m"})[0] == 200
            doc = s.json("GET", "/api/orion/ps")
            (m,) = doc["models"]
            (ram,) = [row for row in m["memory"] if row["device"] == "ram"]
            assert ram["estimate_bytes"] == m["estimate_bytes"] and ram["measured_bytes"] == m["measured_bytes"]
            assert ram["measured_bytes"] > 100 * MiB and m["budget_bytes"] == ram["measured_bytes"]
            assert doc["used_bytes"] == m["budget_bytes"]
            error = (ram["estimate_bytes"] - ram["measured_bytes"]) / ram["measured_bytes"]
            assert ram["error"] == pytest.approx(error, abs=1e-4)
            loaded = [e for e in doc["events"] if e["kind"] == "loaded"][-1]["detail"]
            assert f"measured {ram['measured_bytes'] / MiB:.0f} MiB RAM" in loaded and " %" in loaded, loaded

            _, _, payload = s.request("GET", "/metrics")
            text = payload.decode()
            assert (f'orion_model_memory_estimate_bytes{{model="gemma3-270m",device="ram"}} '
                    f'{ram["estimate_bytes"]}') in text
            assert (f'orion_model_memory_measured_bytes{{model="gemma3-270m",device="ram"}} '
                    f'{ram["measured_bytes"]}') in text
            assert f'orion_model_memory_bytes{{model="gemma3-270m"}} {m["estimate_bytes"]}' in text

            table = subprocess.run([sys.executable, "-m", "orion_cli", "ps"], env=s.env | {"COLUMNS": "80"},
                                   capture_output=True, text=True, timeout=120)
            assert table.returncode == 0, table.stderr
            header = next(line for line in table.stdout.splitlines() if "device" in line).split()
            assert header == ["model", "device", "estimate", "measured", "error", "estimate", "from"]
            row = next(line for line in table.stdout.splitlines() if " ram " in line)
            assert f"{ram['error'] * 100:+.1f} %" in row
            if start == "first":
                assert m["estimate_source"] == "estimate" and m["estimate_figures"] == "llama.cpp dry run"
                assert "llama.cpp's dry run" in row
                # what the ledger holds: the model's own figure (the runner's interpreter and library apart)
                (rec,) = json.loads((home / "memory-ledger.json").read_text())["records"]
                assert rec["name"] == "gemma3-270m" and rec["file"].endswith(".gguf")
                assert rec["measured"]["ram"] + rec["runner_base_bytes"] == ram["measured_bytes"]
                assert rec["estimate"]["ram"] == ram["estimate_bytes"] - RUNNER_BASE_BYTES
                formula = ram["estimate_bytes"]
            else:  # the same model and settings after a restart: its last load's figure is the estimate
                assert m["estimate_source"] == "measured at its last load" and "its last load" in row
                assert ram["estimate_bytes"] == recorded != formula
                assert "(measured at its last load)" in loaded
        finally:
            assert s.stop() == 0
        (rec,) = json.loads((home / "memory-ledger.json").read_text())["records"]  # as the server left it
        recorded = rec["measured"]["ram"] + rec["runner_base_bytes"]
