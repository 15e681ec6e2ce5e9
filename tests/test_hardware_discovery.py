"""Discovery: NVML when present (faked here), torch / CPU-only fallback when not, JSON round trip."""

from __future__ import annotations

import builtins
import json
import sys
import types

import pytest

from training.hardware import discovery
from training.hardware.discovery import GpuInfo, HardwareProfile, bandwidth_class, discover

GIB = 1 << 30


def fake_pynvml(n_gpus: int = 2, switch: bool = True) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    memory = types.SimpleNamespace(total=80 * GIB, free=79 * GIB)
    nvml.NVMLError = NVMLError
    nvml.NVML_CLOCK_MEM, nvml.NVML_NVLINK_MAX_LINKS, nvml.NVML_FEATURE_ENABLED = 2, 18, 1
    nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH, nvml.NVML_P2P_CAPS_INDEX_READ, nvml.NVML_P2P_STATUS_OK = 2, 0, 0
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: n_gpus
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: memory
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    nvml.nvmlDeviceGetMemoryBusWidth = lambda h: 5120
    nvml.nvmlDeviceGetMaxClockInfo = lambda h, clock: 2619
    nvml.nvmlDeviceGetNvLinkState = lambda h, link: 1
    nvml.nvmlDeviceGetNvLinkRemoteDeviceType = lambda h, link: 2 if switch else 1
    nvml.nvmlDeviceGetP2PStatus = lambda a, b, caps: 0
    return nvml


def test_nvml_profile(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    profile = discover(output_dir=tmp_path)
    assert profile.source == "nvml" and profile.gpu_count == 2
    assert profile.link == "nvswitch" and profile.nvlink_count == 18 and profile.p2p
    gpu = profile.gpus[0]
    assert gpu.fp8 and gpu.compute_capability == (9, 0) and gpu.bandwidth_class == "hbm3"
    assert profile.disk_free_bytes > 0 and profile.ram_bytes > 0 and profile.cpu_cores >= 1


def test_free_override_replaces_nvml_free(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(n_gpus=1))
    profile = discover(output_dir=tmp_path, free_bytes_override=20 * GIB)
    assert profile.gpus[0].free_bytes == 20 * GIB and profile.link == "none"
    with pytest.raises(ValueError, match="one per GPU"):
        discover(output_dir=tmp_path, free_bytes_override=[1, 2, 3])


def test_missing_nvml_falls_back(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    profile = discover(output_dir=tmp_path)
    assert profile.source in ("torch", "none")
    assert any("NVML unavailable" in note for note in profile.notes)
    assert not any("Error" in note or "nvmlInit" in note for note in profile.notes), profile.notes
    if profile.source == "none":
        assert any(note.startswith("No NVIDIA GPU") and "on the CPU" in note for note in profile.notes)
    assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_profile_json_round_trip_and_validation():
    gpu = GpuInfo(name="NVIDIA A10", total_bytes=22 * GIB, free_bytes=21 * GIB, compute_capability=(8, 6), fp8=False,
                  bandwidth_class="gddr")  # fmt: skip
    profile = HardwareProfile(gpus=(gpu, gpu), link="nvlink", nvlink_count=4, p2p=True, cpu_cores=32,
                              ram_bytes=128 * GIB, disk_free_bytes=GIB, source="test")  # fmt: skip
    assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert "2x NVIDIA A10" in profile.describe()
    with pytest.raises(ValueError, match="free_bytes"):
        GpuInfo(name="x", total_bytes=GIB, free_bytes=2 * GIB, compute_capability=(8, 0), fp8=False)
    with pytest.raises(ValueError, match="link"):
        HardwareProfile(link="infiniband")


def test_bandwidth_classes():
    assert [bandwidth_class(v) for v in (3350, 1555, 600, None)] == ["hbm3", "hbm2", "gddr", "unknown"]
    assert discovery.LINKS[0] == "nvswitch"


def fake_pynvml_with_uuids(n_gpus: int) -> types.ModuleType:
    nvml = fake_pynvml(n_gpus=n_gpus)
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h}abc-{h}".encode()
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: uuid
    return nvml


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("2", [2]),
        ("3,1", [3, 1]),  # CUDA's order, not NVML's
        ("1,7,2", [1]),  # like CUDA: the list ends at the first entry that names no device
        ("", []),
        ("-1", []),
        ("GPU-2abc", [2]),  # a unique UUID prefix
        ("GPU-", []),  # ambiguous prefix
        ("0,0", [0]),
        ("MIG-xyz", ["MIG-xyz"]),
    ],
)
def test_visible_handles_follow_cuda_visible_devices(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert discovery.visible_nvml_handles(fake_pynvml_with_uuids(4)) == expected


def test_discovery_and_sampler_see_the_same_gpus(monkeypatch, tmp_path):
    """ComfyUI started on one device of four: the plan may use one GPU, and the run reports that one."""
    from training.run.events import GpuSampler

    nvml = fake_pynvml_with_uuids(4)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 100_000
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * GIB, free=79 * GIB, used=GIB)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    profile = discover(output_dir=tmp_path)
    assert profile.gpu_count == 1 and profile.link == "none"
    sampler = GpuSampler.start(interval_s=60)
    try:
        assert sampler.latest()["gpu_count"] == 1
    finally:
        sampler.stop()


def test_ram_is_capped_by_the_container_limit(tmp_path, monkeypatch):
    """A 24 GiB container on a 64 GiB host plans with 24 GiB (the CPU budget was host RAM)."""
    limit = tmp_path / "memory.max"
    limit.write_text(f"{24 * GIB}\n")
    assert discovery.cgroup_memory_limit([str(tmp_path / "absent"), str(limit)]) == 24 * GIB
    limit.write_text("max\n")
    assert discovery.cgroup_memory_limit([str(limit)]) is None
    limit.write_text(f"{1 << 62}\n")
    assert discovery.cgroup_memory_limit([str(limit)]) is None
    monkeypatch.setattr(discovery, "cgroup_memory_limit", lambda: 2 * GIB)
    assert discovery.host_ram_bytes() == 2 * GIB


def test_available_ram_comes_from_meminfo_without_psutil_and_never_exceeds_the_ram(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    monkeypatch.setattr(discovery, "host_ram_bytes", lambda: 8 * GIB)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    3000000 kB\n")
    assert discovery.host_available_bytes(str(meminfo)) == 3000000 * 1024
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n")
    assert discovery.host_available_bytes(str(meminfo)) == 8 * GIB  # a container's limit below the host's RAM
    assert discovery.host_available_bytes(str(tmp_path / "absent")) == 8 * GIB


def test_cpu_machine_note_names_no_exception(monkeypatch, tmp_path):
    """NVML's library missing on a CPU machine is expected: the note says so in words, without a RuntimeError."""
    from training.hardware import discovery

    def no_library():
        raise RuntimeError("nvmlInit failed: NVML Shared Library Not Found")

    monkeypatch.setattr(discovery, "_nvml_gpus", no_library)
    monkeypatch.setattr(discovery, "_torch_gpus", lambda: ([], "none", 0, False))
    profile = discover(output_dir=tmp_path)
    assert profile.source == "none"
    assert profile.notes == (
        "No NVIDIA GPU: NVML unavailable (NVML Shared Library Not Found) and torch sees no CUDA device, so training "
        "runs on the CPU",
    )
