"""How orion builds llama-cpp-python for a machine: compiler per CPU, a wheel-house per
configuration, the compiler read back from the installed build, and the crash advice.
Nothing here depends on the CPU running the tests: CPUs are given as flag lists."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from orion_cli import enginebuild as eb

XEON_AMX = ("AVX", "AVX2", "AVX512", "F16C", "FMA", "AMX")
EPYC = ("AVX", "AVX2", "F16C", "FMA")


def test_amx_cpus_get_clang_and_others_the_default_compiler():
    amx = eb.plan_build(XEON_AMX)
    assert (amx.cc, amx.cxx) == ("clang-19", "clang++-19") and "libomp-19-dev" in amx.apt_packages
    env = amx.env({"CC": "gcc", "PATH": "/bin"})
    assert env["CC"] == "clang-19" and env["CXX"] == "clang++-19" and env["CMAKE_ARGS"] == "-DGGML_RPC=ON"
    plain = eb.plan_build(EPYC)
    assert plain.cc is None and plain.apt_packages == ()
    assert "CC" not in plain.env({"CC": "gcc", "PATH": "/bin"})  # pip's default, whatever the shell set
    assert eb.has_amx(["amx_tile"]) and not eb.has_amx(EPYC)


def test_every_build_has_the_rpc_backend_and_cuda_adds_to_it():
    """orion rpc-server and --rpc need -DGGML_RPC=ON; a CMAKE_ARGS of one's own keeps it."""
    assert eb.plan_build(EPYC).cmake_args == "-DGGML_RPC=ON"
    assert eb.plan_build(EPYC, cmake_args="-DGGML_RPC=ON").cmake_args == "-DGGML_RPC=ON"
    assert eb.plan_build(EPYC, cmake_args="-DGGML_NATIVE=OFF").cmake_args == "-DGGML_RPC=ON -DGGML_NATIVE=OFF"
    assert eb.plan_build(XEON_AMX, cuda=True).cmake_args == "-DGGML_RPC=ON -DGGML_CUDA=on"


def test_each_configuration_has_its_own_wheel_folder():
    """pip's cache is keyed by version alone; the wheel-house by version, compiler, flags and CPU."""
    amx, plain = eb.plan_build(XEON_AMX), eb.plan_build(EPYC)
    keys = {
        amx.key("Debian clang version 19.1.7", "xeon|AMX"),
        plain.key("gcc (Debian 12.2.0-14) 12.2.0", "xeon|AMX"),
        plain.key("gcc (Debian 12.2.0-14) 12.2.0", "epyc|AVX2"),
        eb.plan_build(EPYC, cmake_args="-DGGML_NATIVE=OFF").key("gcc (Debian 12.2.0-14) 12.2.0", "epyc|AVX2"),
    }
    assert len(keys) == 4
    assert all(k.startswith(f"llama-cpp-python-{eb.LLAMA_CPP_VERSION}-") for k in keys)
    assert eb.wheel_house({"ORION_WHEEL_HOUSE": "/w"}) == Path("/w")
    assert eb.wheel_house({"XDG_CACHE_HOME": "/c"}) == Path("/c/orion/engine-wheels")


class FakeRun:
    """Records commands; `pip wheel` writes a wheel into its --wheel-dir, like the real one."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict | None]] = []

    def __call__(self, cmd, env=None, **kwargs):
        self.calls.append((list(cmd), env))
        if cmd[1:] == ["--version"]:
            return subprocess.CompletedProcess(cmd, 0, stdout=f"{cmd[0]} version 19.1.7\nTarget: x86_64\n")
        if "wheel" in cmd:
            out = Path(cmd[cmd.index("--wheel-dir") + 1])
            (out / f"llama_cpp_python-{eb.LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(cmd, 0)

    def commands(self, word: str) -> list[list[str]]:
        return [c for c, _ in self.calls if word in c]


def test_install_builds_once_then_reuses_its_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(eb, "_cpu_identity", lambda: ("Xeon", XEON_AMX))
    monkeypatch.setattr(eb.shutil, "which", lambda name: f"/usr/bin/{name}")
    env = {"ORION_WHEEL_HOUSE": str(tmp_path)}
    run, said = FakeRun(), []
    wheel = eb.install_engine("/venv/python", say=said.append, env=env, run=run)
    (build,) = run.commands("wheel")
    assert build[:3] == ["/venv/python", "-m", "pip"]
    assert "--no-cache-dir" in build and build[build.index("--no-binary") + 1] == "llama-cpp-python"
    build_env = next(e for c, e in run.calls if c == build)
    assert build_env["CC"] == "clang-19" and build_env["CXX"] == "clang++-19"
    assert run.commands("install")[-1][-1] == str(wheel) and wheel.parent.parent == tmp_path

    again = FakeRun()
    assert eb.install_engine("/venv/python", say=said.append, env=env, run=again) == wheel
    assert again.commands("wheel") == [] and any("reusing" in line for line in said)
    assert len(again.commands("install")) == 1


def test_a_missing_compiler_is_installed_as_root_or_explained(monkeypatch):
    plan = eb.plan_build(XEON_AMX)
    monkeypatch.setattr(eb.shutil, "which", lambda name: None)
    monkeypatch.setattr(eb.os, "geteuid", lambda: 1000)
    with pytest.raises(eb.EngineBuildError, match="clang-19 is needed") as info:
        eb.ensure_compiler(plan, print, run=FakeRun())
    assert "apt-get install" in info.value.hint and "clang-19" in info.value.hint

    installed = set()
    monkeypatch.setattr(eb.os, "geteuid", lambda: 0)
    monkeypatch.setattr(eb.shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed | {"apt-get"} else None)

    def apt(cmd, env=None, **kwargs):
        installed.update(cmd[4:] if cmd[:2] == ["apt-get", "install"] else [])
        return subprocess.CompletedProcess(cmd, 0)

    said = []
    eb.ensure_compiler(plan, said.append, run=apt)
    assert "clang-19" in installed and "apt-get" in said[0]
    eb.ensure_compiler(eb.plan_build(EPYC), said.append, run=None)  # nothing to install: run is not called


def test_the_compiler_is_read_back_from_the_installed_build():
    """Wheels are stripped; the OpenMP runtime each library links says which compiler built it."""
    assert eb.compiler_of(["libomp.so.5", "libc.so.6"]).startswith("clang")
    assert eb.compiler_of(["libgomp.so.1", "libc.so.6"]).startswith("GCC")
    assert eb.compiler_of(["libc.so.6"]) is None
    libs = eb.engine_libraries()
    assert any(p.name.startswith("libggml-cpu") for p in libs)
    needed = eb.elf_needed(next(p for p in libs if p.name.startswith("libllama")))
    assert any(n.startswith("libggml") for n in needed) and "libc.so.6" in needed
    assert eb.elf_needed(Path(__file__)) == []  # not an ELF file


def test_crash_advice_names_the_compiler_the_cpu_and_one_command():
    amx = eb.crash_advice("Intel Xeon", XEON_AMX, "GCC (links GCC's OpenMP runtime, libgomp)", "/v/bin/python")
    assert "GCC" in amx and "Intel Xeon" in amx and "AMX" in amx and "clang-19" in amx
    assert "'/v/bin/python -m orion_cli.enginebuild install --rebuild'" in amx
    other = eb.crash_advice("AMD EPYC", EPYC, None, "/v/bin/python")
    assert "could not identify" in other and "install --rebuild" in other and "AMX" not in other


def test_the_pinned_engine_is_the_installed_one():
    """engine.py reaches into llama-cpp-python's internals: a different release must fail here, loudly."""
    assert metadata.version("llama-cpp-python") == eb.LLAMA_CPP_VERSION
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"llama-cpp-python=={eb.LLAMA_CPP_VERSION}"' in pyproject


def test_plan_runs_from_the_source_tree_with_the_standard_library_only():
    code = ("import sys; import orion_cli.enginebuild as e; e.main(['plan']); "
            "heavy = [m for m in ('numpy', 'gguf', 'llama_cpp', 'yaml', 'typer') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "wheel-house:" in proc.stdout and eb.LLAMA_CPP_VERSION in proc.stdout
