"""How llama-cpp-python is built on this machine: the compiler, the CMake flags, and a wheel-house.

On Intel Xeons with AMX, ggml's AMX kernels built by GCC crash (SIGSEGV) at the
first decode of a quantized model (measured with Debian's GCC 12.2 and a CUDA
host's GCC 13.3; Ollama traced the same crash to GCC 11 and moved to 13). Built
by clang-19 they run, and a quantized decode is ~1.4x faster than with the safe
setting (``use_extra_bufts`` off). So on a CPU with AMX orion builds the engine
with clang-19 (installing it with apt-get when it runs as root on Debian or
Ubuntu), elsewhere with the default compiler, as pip would.

pip's wheel cache is keyed by package and version only: a wheel built once with
GCC is silently reused for a clang build. Each configuration's wheel is kept in
a folder of its own (``wheel_house``), keyed by version, compiler, CMake flags
and CPU (llama.cpp builds for the CPU it is built on), and pip's cache is never
used for it.

    python -m orion_cli.enginebuild plan      what would be built, and where its wheel lives
    python -m orion_cli.enginebuild install   build (or reuse) the wheel and install it
    python -m orion_cli.enginebuild install --cuda   the same with llama.cpp's CUDA backend (make gpu)
    python -m orion_cli.enginebuild verify    what the installed build is, and the engine check

This module uses the standard library only: the Makefile runs it from the source
tree before the virtual environment has anything else.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import OrionError

# The llama-cpp-python release orion is written against (engine.py reaches into its
# internals); pyproject.toml pins the same version (a test checks they agree).
LLAMA_CPP_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"

# The compiler measured to build ggml's AMX kernels correctly, and the Debian
# packages that bring it (libomp: the OpenMP runtime ggml's thread pool uses).
AMX_CC, AMX_CXX = "clang-19", "clang++-19"
AMX_APT_PACKAGES = ("clang-19", "libomp-19-dev")


class EngineBuildError(OrionError):
    """The engine could not be built or installed as planned."""


@dataclass(frozen=True)
class BuildPlan:
    """How to build llama-cpp-python here."""

    version: str
    cc: str | None  # None: the default compiler, as a plain pip install uses
    cxx: str | None
    cmake_args: str
    reason: str
    apt_packages: tuple[str, ...] = ()
    extra_path: str = ""  # a folder to put first on PATH (nvcc's)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a build runs in."""
        env = dict(os.environ if base is None else base)
        env.pop("CC", None)
        env.pop("CXX", None)
        if self.cc:
            env["CC"], env["CXX"] = self.cc, self.cxx or self.cc
        env["CMAKE_ARGS"] = self.cmake_args
        if self.extra_path:
            env["PATH"] = f"{self.extra_path}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        return env

    def key(self, compiler: str, cpu: str) -> str:
        """The wheel-house folder name: one per version, compiler, CMake flags and CPU."""
        digest = hashlib.sha256(f"{compiler}|{self.cmake_args}|{cpu}".encode()).hexdigest()[:12]
        name = Path(self.cc).name if self.cc else "cc"
        return f"{PACKAGE}-{self.version}-{name}-{digest}"


def has_amx(cpu_flags: Sequence[str]) -> bool:
    """Whether the CPU has AMX (orion's flag names, or /proc/cpuinfo's)."""
    return any(f in ("AMX", "amx_tile", "amx_int8") for f in cpu_flags)


CUDA_CMAKE_ARGS = "-DGGML_CUDA=on"
# llama.cpp's RPC backend (orion rpc-server, run --rpc): always built. pip's wheel cache ignores
# CMAKE_ARGS and would hand back a wheel built without it; the wheel-house key includes the flags.
RPC_CMAKE_ARGS = "-DGGML_RPC=ON"


def plan_build(cpu_flags: Sequence[str], *, cmake_args: str = "", version: str = LLAMA_CPP_VERSION,
               cuda: bool = False) -> BuildPlan:
    """The compiler and flags for this CPU (``cuda``: with llama.cpp's CUDA backend as well); the RPC
    backend always."""
    if RPC_CMAKE_ARGS not in cmake_args:
        cmake_args = f"{RPC_CMAKE_ARGS} {cmake_args}".strip()
    if cuda and CUDA_CMAKE_ARGS not in cmake_args:
        cmake_args = f"{cmake_args} {CUDA_CMAKE_ARGS}".strip()
    gpu = " (+ CUDA)" if cuda else ""
    if has_amx(cpu_flags):
        return BuildPlan(version, AMX_CC, AMX_CXX, cmake_args,
                         f"the CPU has AMX: {AMX_CC} builds ggml's AMX kernels correctly (GCC's crash){gpu}",
                         AMX_APT_PACKAGES)
    return BuildPlan(version, None, None, cmake_args, f"no AMX on this CPU: the default compiler, as pip uses{gpu}")


def find_nvcc(env: Mapping[str, str] | None = None) -> str | None:
    """CUDA's compiler: on the PATH, under CUDA_HOME, or in /usr/local/cuda."""
    env = os.environ if env is None else env
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for base in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / "nvcc").exists():
            return str(Path(base) / "bin" / "nvcc")
    return None


def compiler_identity(cc: str | None, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str:
    """The first line of the compiler's ``--version`` ('' when it is not there)."""
    exe = cc or os.environ.get("CC") or "cc"
    try:
        done = run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or "").splitlines()[0].strip() if done.returncode == 0 and done.stdout else ""


def wheel_house(env: Mapping[str, str] | None = None) -> Path:
    """Where built engine wheels are kept: ``ORION_WHEEL_HOUSE``, else the user's cache folder."""
    env = os.environ if env is None else env
    if env.get("ORION_WHEEL_HOUSE"):
        return Path(env["ORION_WHEEL_HOUSE"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "orion" / "engine-wheels"


def _cpu_identity() -> tuple[str, tuple[str, ...]]:
    from .device import cpu_info

    model, flags, _ = cpu_info()
    return model, flags


def ensure_compiler(plan: BuildPlan, say: Callable[[str], None],
                    run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Make sure the plan's compiler is here; as root on Debian/Ubuntu, install it with apt-get."""
    if plan.cc is None or shutil.which(plan.cc):
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *plan.apt_packages]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineBuildError(
            f"{plan.cc} is needed to build llama.cpp for this CPU ({plan.reason}) and is not installed",
            hint=f"install it ('sudo {shlex.join(command)}' on Debian/Ubuntu), then run this again",
        )
    say(f"installing {', '.join(plan.apt_packages)} with apt-get ({plan.reason})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = run(command, env=env)
    if done.returncode != 0:  # the package lists may be missing on a fresh machine
        run(["apt-get", "update"], env=env)
        done = run(command, env=env)
    if done.returncode != 0 or not shutil.which(plan.cc):
        raise EngineBuildError(f"apt-get could not install {plan.cc}",
                               hint=f"install {' '.join(plan.apt_packages)} by hand, then run this again")


def built_wheel(folder: Path, version: str) -> Path | None:
    """The engine wheel already built into ``folder``, if any."""
    wheels = sorted(folder.glob(f"llama_cpp_python-{version}-*.whl"))
    return wheels[-1] if wheels else None


def build_wheel(plan: BuildPlan, folder: Path, python: str, say: Callable[[str], None],
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """Build the wheel from source into ``folder`` (never from or into pip's cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    compiler = plan.cc or "the default compiler"
    say(f"building {PACKAGE} {plan.version} with {compiler} (about 5 minutes on 2 cores) into {folder}")
    command = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
               "--wheel-dir", str(folder), f"{PACKAGE}=={plan.version}"]
    done = run(command, env=plan.env())
    wheel = built_wheel(folder, plan.version)
    if done.returncode != 0 or wheel is None:
        raise EngineBuildError(f"building {PACKAGE} {plan.version} with {compiler} failed",
                               hint="the build log is above; check that cmake and a C++ compiler are installed")
    return wheel


def install_engine(python: str = sys.executable, *, say: Callable[[str], None] = print,
                   env: Mapping[str, str] | None = None, rebuild: bool = False, cuda: bool = False,
                   run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """Build this machine's engine wheel (or reuse the one in its wheel-house) and install it.

    ``cuda``: llama.cpp's CUDA backend too (``make gpu``); its wheel has a wheel-house folder
    of its own (the CMake flags are in the key), so the CPU build stays where it is."""
    model, flags = _cpu_identity()
    plan = plan_build(flags, cmake_args=(env or os.environ).get("CMAKE_ARGS", ""), cuda=cuda)
    if cuda:
        nvcc = find_nvcc(env)
        if nvcc is None:
            raise EngineBuildError("CUDA's compiler (nvcc) is not installed: the CUDA build needs the CUDA toolkit",
                                   hint="install the CUDA toolkit (nvcc) or set CUDA_HOME, then run 'make gpu' again")
        plan = BuildPlan(plan.version, plan.cc, plan.cxx, plan.cmake_args, plan.reason, plan.apt_packages,
                         extra_path=str(Path(nvcc).parent))
    ensure_compiler(plan, say, run)
    compiler = compiler_identity(plan.cc, run)
    folder = wheel_house(env) / plan.key(compiler, f"{model}|{'+'.join(flags)}")
    wheel = None if rebuild else built_wheel(folder, plan.version)
    if wheel is None:
        wheel = build_wheel(plan, folder, python, say, run)
    else:
        say(f"reusing {wheel} ({compiler or 'default compiler'})")
    done = run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheel)])
    if done.returncode != 0:
        raise EngineBuildError(f"installing {wheel.name} failed", hint="pip's output is above")
    return wheel


# ---------------------------------------------------------------- what the installed build is


def elf_needed(path: Path) -> list[str]:
    """The shared libraries an ELF file needs (its DT_NEEDED entries), read without readelf."""
    import struct

    try:
        with path.open("rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return []  # only 64-bit little-endian ELF (x86-64, aarch64 Linux)
            shoff, = struct.unpack_from("<Q", ident, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", ident, 0x3A)
            if shentsize != 64 or not 0 < shnum < 4096:
                return []
            f.seek(shoff)
            table = f.read(shnum * 64)
            if len(table) < shnum * 64:
                return []
            # (type, link, offset, size) of each section
            sections = [struct.unpack_from("<4xI16xQQI", table, i * 64) for i in range(shnum)]

            def read(index: int) -> bytes:
                _, offset, size, _ = sections[index]
                f.seek(offset)
                return f.read(min(size, 1 << 22))

            for index, (kind, _, _, link) in enumerate(sections):
                if kind != 6 or link >= shnum:  # SHT_DYNAMIC, its strings in section `link`
                    continue
                dynamic, strings = read(index), read(link)
                names = []
                for at in range(0, len(dynamic) - 15, 16):
                    tag, value = struct.unpack_from("<qQ", dynamic, at)
                    if tag == 0:  # DT_NULL
                        break
                    if tag == 1 and value < len(strings):  # DT_NEEDED
                        names.append(strings[value:strings.find(b"\0", value)].decode(errors="replace"))
                return names
    except (OSError, struct.error):
        return []
    return []


def compiler_of(needed: Sequence[str]) -> str | None:
    """The compiler family that built a library, from the OpenMP runtime it links.

    Wheels are stripped (no ``.comment`` section), but ggml's thread pool links
    the OpenMP runtime of the compiler that built it: GCC's libgomp or LLVM's libomp.
    """
    if any(n.startswith("libgomp") for n in needed):
        return "GCC (links GCC's OpenMP runtime, libgomp)"
    if any(n.startswith(("libomp.", "libomp5")) for n in needed):
        return "clang (links LLVM's OpenMP runtime, libomp)"
    return None


def engine_libraries() -> list[Path]:
    """llama-cpp-python's shared libraries (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if not spec or not spec.submodule_search_locations:
        return []
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return sorted({p.resolve() for p in lib.glob("lib*.so*")})


def installed_compiler() -> str | None:
    """The compiler that built the installed engine's CPU backend (None when it cannot be read)."""
    libs = engine_libraries()
    cpu = [p for p in libs if p.name.startswith("libggml-cpu")] or [p for p in libs if "llama" in p.name]
    for path in cpu:
        found = compiler_of(elf_needed(path))
        if found:
            return found
    return None


def rebuild_command(python: str = sys.executable) -> str:
    """The one command that rebuilds the engine for this machine (installing the compiler if needed)."""
    return f"{shlex.quote(python)} -m orion_cli.enginebuild install --rebuild"


def crash_advice(cpu_model: str, cpu_flags: Sequence[str], compiler: str | None,
                 python: str = sys.executable) -> str:
    """Why llama.cpp's defaults crash here, and the one command that rebuilds it the fast way."""
    built = f"built by {compiler}" if compiler else "built by a compiler orion could not identify"
    command = rebuild_command(python)
    if has_amx(cpu_flags):
        return (f"this llama.cpp was {built}; on {cpu_model}, which has AMX, GCC-built AMX kernels crash. "
                f"Built by {AMX_CC} they run, and decode about 1.4x faster than the safe settings: "
                f"'{command}' rebuilds it (installing {AMX_CC} with apt-get as root)")
    return (f"this llama.cpp was {built} and crashes with its defaults on {cpu_model}: "
            f"'{command}' rebuilds it for this CPU")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m orion_cli.enginebuild", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["plan", "install", "verify"])
    parser.add_argument("--rebuild", action="store_true", help="build again even if the wheel-house has it")
    parser.add_argument("--cuda", action="store_true", help="with llama.cpp's CUDA backend (NVIDIA GPUs; needs nvcc)")
    args = parser.parse_args(argv)
    say = lambda line: print(f"orion engine: {line}", flush=True)  # noqa: E731
    try:
        if args.action == "plan":
            model, flags = _cpu_identity()
            plan = plan_build(flags, cmake_args=os.environ.get("CMAKE_ARGS", ""), cuda=args.cuda)
            compiler = compiler_identity(plan.cc) if plan.cc is None or shutil.which(plan.cc) else ""
            say(f"{PACKAGE} {plan.version} with {plan.cc or 'the default compiler'}: {plan.reason}")
            say(f"wheel-house: {wheel_house() / plan.key(compiler, f'{model}|{chr(43).join(flags)}')}")
        elif args.action == "install":
            install_engine(say=say, rebuild=args.rebuild, cuda=args.cuda)
        else:
            return verify(say)
    except OrionError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    return 0


def verify(say: Callable[[str], None]) -> int:
    """Say which compiler built the installed engine and run the engine check on it (afresh)."""
    from .enginecheck import check_engine, engine_key
    from .device import cpu_info

    say(f"{PACKAGE} built by {installed_compiler() or 'an unknown compiler'}")
    model, flags, _ = cpu_info()
    check = check_engine(engine_key(model, flags), force=True)
    say(f"engine check on {model}: {check.verdict()}")
    say("GPU offload: " + ("yes (llama_supports_gpu_offload)" if check.gpu_offload else
                           "no (a CPU build; 'make gpu' builds it with CUDA)"))
    say("RPC backend: " + ("yes (orion rpc-server, --rpc)" if check.rpc else
                           f"no: '{rebuild_command()}' builds it with {RPC_CMAKE_ARGS}"))
    if not check.default_ok and has_amx(flags):
        say(f"warning: the fast AMX path is off; '{rebuild_command()}' rebuilds it with {AMX_CC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
