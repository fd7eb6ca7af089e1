import subprocess

from conftest import FIXTURES

from orion_cli.device import (
    GPUInfo,
    detect_device,
    detect_gpus,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
    read_cgroup_memory,
    simulate,
)

GiB = 1024**3
MiB = 1024**2


def cgroup(name):
    base = FIXTURES / name
    return read_cgroup_memory(base / "sys", base / "proc_self_cgroup")


def test_cgroup_v1_limit_without_namespace_reads_the_mount_root():
    # Docker without a cgroup namespace: /proc/self/cgroup names /docker/<id>,
    # which is not mounted inside; the container's own cgroup is the mount root.
    mem = cgroup("cgroup-v1-docker")
    assert mem.version == 1
    assert mem.limit_bytes == 3 * GiB
    # usage minus reclaimable inactive page cache
    assert mem.usage_bytes == 1288490188 - 214748364


def test_cgroup_v1_unlimited_is_none():
    # Recorded on this project's CI machine: v1, the huge "no limit" value.
    mem = cgroup("cgroup-v1-unlimited")
    assert mem.version == 1
    assert mem.limit_bytes is None
    assert mem.usage_bytes == 1218740224 - 549183488


def test_cgroup_v2_limit_set_on_a_parent_applies():
    # Kubernetes: the pod slice sets 2 GiB, the container scope says "max".
    mem = cgroup("cgroup-v2-k8s")
    assert mem.version == 2
    assert mem.limit_bytes == 2 * GiB
    assert mem.usage_bytes == 734003200 - 209715200


def test_cgroup_v2_leaf_limit_smaller_than_parent(tmp_path):
    sys = tmp_path / "sys"
    leaf = sys / "a" / "b"
    leaf.mkdir(parents=True)
    (sys / "cgroup.controllers").write_text("memory\n")
    (sys / "a" / "memory.max").write_text(f"{4 * GiB}\n")
    (leaf / "memory.max").write_text(f"{1 * GiB}\n")
    (leaf / "memory.current").write_text("1000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    mem = read_cgroup_memory(sys, proc)
    assert (mem.version, mem.limit_bytes, mem.usage_bytes) == (2, 1 * GiB, 1000)


def test_no_cgroup_files(tmp_path):
    assert read_cgroup_memory(tmp_path / "nothing", tmp_path / "missing") is None


def test_detect_device_uses_a_cgroup_limit_smaller_than_ram():
    base = FIXTURES / "cgroup-v1-docker"
    device = detect_device(cgroup_root=base / "sys", proc_cgroup=base / "proc_self_cgroup", gpu_probe=tuple)
    assert device.memory_limit_bytes == 3 * GiB
    assert device.memory_limit_source == "cgroup v1 limit"
    assert device.memory_in_use_bytes == 1288490188 - 214748364
    assert device.memory_available_bytes == 3 * GiB - device.memory_in_use_bytes


def test_detect_device_without_cgroup_limit_uses_ram():
    base = FIXTURES / "cgroup-v1-unlimited"
    device = detect_device(cgroup_root=base / "sys", proc_cgroup=base / "proc_self_cgroup", gpu_probe=tuple)
    assert device.memory_limit_source == "physical RAM"
    assert device.memory_limit_bytes == device.ram_total_bytes
    assert device.logical_cores >= device.physical_cores >= 1
    assert device.usable_cores >= 1
    assert device.disk_free_bytes > 0
    assert device.gpus == ()


def test_cpu_flags_from_cpuinfo():
    model, flags, physical = parse_cpuinfo((FIXTURES / "cpuinfo-xeon-amx.txt").read_text())
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert flags == ("AVX", "AVX2", "AVX512", "F16C", "FMA", "AMX")
    assert physical == 2  # two (physical id, core id) pairs over three logical CPUs
    _, arm, arm_cores = parse_cpuinfo((FIXTURES / "cpuinfo-graviton.txt").read_text())
    assert arm == ("NEON",)
    assert arm_cores is None  # ARM cpuinfo has no core ids: psutil counts them


def test_ram_from_meminfo_matches_psutil():
    import psutil

    text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n"
    assert parse_meminfo(text) == (24576000 * 1024, 20480000 * 1024)
    assert parse_meminfo("MemTotal: 1 kB\n") is None
    device = detect_device(gpu_probe=tuple)
    assert device.ram_total_bytes == psutil.virtual_memory().total
    assert device.physical_cores == psutil.cpu_count(logical=False)


def test_nvidia_smi_recorded_output():
    gpus = parse_nvidia_smi((FIXTURES / "nvidia-smi-2xA100.csv").read_text())
    assert gpus == (
        GPUInfo(0, "NVIDIA A100-SXM4-80GB", 81920 * MiB, 80512 * MiB, "550.54.15"),
        GPUInfo(1, "NVIDIA A100-SXM4-80GB", 81920 * MiB, 1024 * MiB, "550.54.15"),
    )
    # Virtual GPUs report [N/A]: nothing usable, and no crash.
    assert parse_nvidia_smi((FIXTURES / "nvidia-smi-na.csv").read_text()) == ()
    assert parse_nvidia_smi("") == ()


def test_detect_gpus_with_and_without_nvidia_smi(monkeypatch):
    import orion_cli.device as device_mod

    monkeypatch.setattr(device_mod, "_nvml_gpus", lambda: None)
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    recorded = (FIXTURES / "nvidia-smi-2xA100.csv").read_text()

    def fake_run(cmd, **kwargs):
        assert cmd[0] == "/usr/bin/nvidia-smi"
        if len(cmd) == 1:  # plain nvidia-smi, for the CUDA version in its header
            return subprocess.CompletedProcess(cmd, 0, (FIXTURES / "nvidia-smi-header.txt").read_text(), "")
        assert "--format=csv,noheader,nounits" in cmd
        return subprocess.CompletedProcess(cmd, 0, recorded, "")

    assert len(detect_gpus(run=fake_run)) == 2

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 9, "", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")

    assert detect_gpus(run=failing_run) == ()

    def missing_run(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    assert detect_gpus(run=missing_run) == ()
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: None)
    assert detect_gpus(run=fake_run) == ()


def test_simulate_replaces_memory_and_gpu():
    real = detect_device(gpu_probe=tuple)
    sim = simulate(real, ram_bytes=3 * GiB, vram_bytes=8 * GiB)
    assert sim.simulated
    assert sim.memory_limit_bytes == 3 * GiB
    assert sim.memory_in_use_bytes == 0
    assert sim.gpus[0].total_bytes == 8 * GiB
    assert sim.cpu_flags == real.cpu_flags


def test_ram_falls_back_to_psutil_without_proc_meminfo(tmp_path):
    import psutil

    from orion_cli.device import ram as _ram

    total, available = _ram(tmp_path / "no-meminfo")
    assert total == psutil.virtual_memory().total and 0 < available <= total
    device = detect_device(meminfo=tmp_path / "no-meminfo", gpu_probe=tuple)
    assert device.ram_total_bytes == psutil.virtual_memory().total
