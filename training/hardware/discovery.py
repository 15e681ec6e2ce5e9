"""What this machine has: GPUs (through NVML, else torch), the links between them, CPU cores, RAM, free disk.

Inside ComfyUI the node layer passes ``free_bytes_override`` from ``comfy.model_management`` (ComfyUI's own models
occupy the card); this module never imports ComfyUI. Profiles round-trip through JSON so a node can hand them to
another node or to the training child process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LINKS = ("nvswitch", "nvlink", "pcie", "none")
BANDWIDTH_CLASSES = ("hbm3", "hbm2", "gddr", "unknown")
#: GB/s thresholds of the bandwidth classes (A100 40 GB ~1.6 TB/s is hbm2, H100 SXM ~3.3 TB/s is hbm3).
_BANDWIDTH_FLOORS = (("hbm3", 2500.0), ("hbm2", 1200.0), ("gddr", 0.0))


def bandwidth_class(gigabytes_per_second: float | None) -> str:
    if gigabytes_per_second is None or gigabytes_per_second <= 0:
        return "unknown"
    return next(name for name, floor in _BANDWIDTH_FLOORS if gigabytes_per_second >= floor)


@dataclass(kw_only=True, frozen=True)
class GpuInfo:
    """One GPU. ``free_bytes`` is what a training process may still allocate; ``fp8`` is compute capability >= 8.9."""

    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    fp8: bool
    bandwidth_class: str = "unknown"

    def __post_init__(self) -> None:
        if self.total_bytes <= 0:
            raise ValueError(f"GpuInfo.total_bytes must be > 0, got {self.total_bytes!r} for {self.name!r}")
        if not 0 <= self.free_bytes <= self.total_bytes:
            raise ValueError(
                f"GpuInfo.free_bytes={self.free_bytes!r} must be within 0..total_bytes={self.total_bytes} "
                f"for {self.name!r}"
            )
        if len(self.compute_capability) != 2:
            raise ValueError(f"GpuInfo.compute_capability must be (major, minor), got {self.compute_capability!r}")
        if self.bandwidth_class not in BANDWIDTH_CLASSES:
            raise ValueError(f"GpuInfo.bandwidth_class {self.bandwidth_class!r} is not one of {BANDWIDTH_CLASSES}")
        object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))


@dataclass(kw_only=True, frozen=True)
class HardwareProfile:
    """The machine a plan is made for. ``link`` is the best path between GPUs; ``nvlink_count`` the active NVLink
    links of one GPU; ``source`` says where the numbers came from (nvml, torch, none, simulated:<tier>)."""

    gpus: tuple[GpuInfo, ...] = ()
    link: str = "none"
    nvlink_count: int = 0
    p2p: bool = False
    cpu_cores: int = 1
    ram_bytes: int = 0
    disk_free_bytes: int = 0
    source: str = "nvml"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"HardwareProfile.link {self.link!r} is not one of {LINKS}")
        if self.cpu_cores < 1:
            raise ValueError(f"HardwareProfile.cpu_cores must be >= 1, got {self.cpu_cores!r}")
        for name in ("nvlink_count", "ram_bytes", "disk_free_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"HardwareProfile.{name} must be >= 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def min_free_bytes(self) -> int:
        """The budget of a data-parallel job is set by its fullest GPU."""
        return min(g.free_bytes for g in self.gpus) if self.gpus else self.ram_bytes

    def describe(self) -> str:
        if not self.gpus:
            return f"CPU only, {self.cpu_cores} cores, {self.ram_bytes / 2**30:.0f} GiB RAM"
        gpu = self.gpus[0]
        major, minor = gpu.compute_capability
        return (
            f"{self.gpu_count}x {gpu.name} ({gpu.total_bytes / 2**30:.1f} GiB, cc {major}.{minor}, "
            f"{gpu.bandwidth_class}), link {self.link}"
            + (f" x{self.nvlink_count}" if self.nvlink_count else "")
            + f", p2p {'yes' if self.p2p else 'no'}, {self.cpu_cores} cores, {self.ram_bytes / 2**30:.0f} GiB RAM"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        gpus = tuple(GpuInfo(**{**g, "compute_capability": tuple(g["compute_capability"])}) for g in data["gpus"])
        return cls(**{**data, "gpus": gpus, "notes": tuple(data.get("notes", ()))})


# -------------------------------------------------------------------------------------------------------------
# discovery


def discover(output_dir: str | os.PathLike | None = None, free_bytes_override=None) -> HardwareProfile:
    """Describe this machine. ``free_bytes_override``: an int (every GPU) or one int per GPU, e.g. ComfyUI's
    free memory, replacing NVML's figure. Falls back to torch when NVML is missing, and to CPU only without CUDA."""
    notes: list[str] = []
    try:
        gpus, link, nvlink_count, p2p = _nvml_gpus()
        source = "nvml"
    except (ImportError, OSError, RuntimeError) as error:  # pynvml missing, no driver, or NVML failed
        gpus, link, nvlink_count, p2p = _torch_gpus()
        source = "torch" if gpus else "none"
        notes.append(_nvml_fallback_note(error, bool(gpus)))
        logger.info("hardware discovery: %s", notes[-1])
    gpus = _apply_free_override(gpus, free_bytes_override, notes)
    profile = HardwareProfile(
        gpus=tuple(gpus),
        link=link,
        nvlink_count=nvlink_count,
        p2p=p2p,
        cpu_cores=_cpu_cores(),
        ram_bytes=host_ram_bytes(),
        disk_free_bytes=shutil.disk_usage(os.fspath(output_dir or os.getcwd())).free,
        source=source,
        notes=tuple(notes),
    )
    logger.info("hardware: %s (source %s)", profile.describe(), profile.source)
    return profile


def _nvml_fallback_note(error: Exception, torch_found_gpus: bool) -> str:
    """Why NVML was not used, in words (no exception class names): on a machine without a GPU that is expected."""
    cause = str(error).removeprefix("nvmlInit failed: ") or type(error).__name__
    if torch_found_gpus:
        return f"NVML unavailable ({cause}); GPUs read through torch.cuda, without link details"
    return f"No NVIDIA GPU: NVML unavailable ({cause}) and torch sees no CUDA device, so training runs on the CPU"


def _apply_free_override(gpus: list[GpuInfo], override, notes: list[str]) -> list[GpuInfo]:
    if override is None:
        return gpus
    values = list(override) if isinstance(override, Sequence) else [int(override)] * len(gpus)
    if len(values) != len(gpus):
        raise ValueError(f"free_bytes_override has {len(values)} values for {len(gpus)} GPUs; pass one per GPU")
    notes.append("free memory supplied by the caller")
    return [dataclasses.replace(g, free_bytes=max(0, min(int(v), g.total_bytes))) for g, v in zip(gpus, values)]


def _nvml_gpus() -> tuple[list[GpuInfo], str, int, bool]:
    import pynvml  # nvidia-ml-py

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        raise RuntimeError(f"nvmlInit failed: {error}") from error
    try:
        handles = visible_nvml_handles(pynvml)
        gpus = [_nvml_gpu(pynvml, handle) for handle in handles]
        link, nvlink_count = _nvml_link(pynvml, handles)
        p2p = len(handles) > 1 and all(_nvml_p2p(pynvml, handles[0], other) for other in handles[1:])
        return gpus, link, nvlink_count, p2p
    finally:
        pynvml.nvmlShutdown()


def visible_nvml_handles(pynvml) -> list:
    """NVML handles of the GPUs CUDA lets this process use, in CUDA's order: ``CUDA_VISIBLE_DEVICES`` as indices or
    (prefixes of) ``GPU-``/``MIG-`` UUIDs; every GPU when unset. Like the CUDA runtime, the list ends at the first
    entry that names no device, so ``""`` and ``"-1"`` hide them all. The one enumeration: discovery (what the plan
    may use) and the engine's GPU sampler (what a run reports) both read it."""
    count = pynvml.nvmlDeviceGetCount()
    every = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return every
    uuids = None
    chosen: dict[object, object] = {}  # index (or MIG UUID) -> handle, in CUDA's order
    for item in (entry.strip() for entry in visible.split(",")):
        key, handle = None, None
        if item.isdigit() and int(item) < count:
            key = int(item)
        elif item.startswith("GPU-"):
            uuids = uuids or [_text(pynvml.nvmlDeviceGetUUID(h)) for h in every]
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(item)]
            key = matches[0] if len(matches) == 1 else None
        elif item.startswith("MIG-"):
            key, handle = item, _mig_handle(pynvml, item)
        if key is None or key in chosen or (isinstance(key, str) and handle is None):
            break
        chosen[key] = every[key] if handle is None else handle
    logger.debug("CUDA_VISIBLE_DEVICES=%r: GPUs %s of %d visible", visible, list(chosen), count)
    return list(chosen.values())


def _mig_handle(pynvml, uuid: str):
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except pynvml.NVMLError as error:
        logger.debug("CUDA_VISIBLE_DEVICES names %s, which NVML does not know: %s", uuid, error)
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_gpu(pynvml, handle) -> GpuInfo:
    name = pynvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    return GpuInfo(
        name=name,
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        compute_capability=capability,
        fp8=capability >= (8, 9),
        bandwidth_class=bandwidth_class(_nvml_bandwidth_gbs(pynvml, handle)),
    )


def _nvml_bandwidth_gbs(pynvml, handle) -> float | None:
    """Bus width x max memory clock x 2 (double data rate); None where the driver does not say."""
    try:
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except pynvml.NVMLError as error:
        logger.debug("memory bandwidth unknown: %s", error)
        return None
    return bus_bits / 8 * clock_mhz * 2 / 1000


def _nvml_link(pynvml, handles) -> tuple[str, int]:
    if len(handles) < 2:
        return "none", 0
    active, to_switch = 0, False
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handles[0], link) != pynvml.NVML_FEATURE_ENABLED:
                continue
        except pynvml.NVMLError:  # NotSupported / InvalidArgument: this GPU has no such link
            break
        active += 1
        try:
            kind = pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handles[0], link)
            to_switch |= kind == getattr(pynvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
        except pynvml.NVMLError as error:
            logger.debug("NVLink %d remote type unknown: %s", link, error)
    if active == 0:
        return "pcie", 0
    return ("nvswitch" if to_switch else "nvlink"), active


def _nvml_p2p(pynvml, first, other) -> bool:
    try:
        status = pynvml.nvmlDeviceGetP2PStatus(first, other, pynvml.NVML_P2P_CAPS_INDEX_READ)
    except pynvml.NVMLError as error:
        logger.debug("P2P status unknown: %s", error)
        return False
    return status == pynvml.NVML_P2P_STATUS_OK


def _torch_gpus() -> tuple[list[GpuInfo], str, int, bool]:
    import torch

    if not torch.cuda.is_available():
        return [], "none", 0, False
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        capability = (props.major, props.minor)
        gpus.append(
            GpuInfo(
                name=props.name,
                total_bytes=int(total),
                free_bytes=int(free),
                compute_capability=capability,
                fp8=capability >= (8, 9),
            )
        )
    p2p = len(gpus) > 1 and all(torch.cuda.can_device_access_peer(0, i) for i in range(1, len(gpus)))
    return gpus, ("pcie" if len(gpus) > 1 else "none"), 0, p2p


def _cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_ram_bytes() -> int:
    """Host RAM, or the container's memory limit when it is lower (a 24 GiB container on a 64 GiB host has 24)."""
    try:
        import psutil
    except ImportError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        total = int(psutil.virtual_memory().total)
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    """Host RAM available to new allocations now (psutil's ``available``, else /proc/meminfo's MemAvailable, else
    all of `host_ram_bytes`), at most the RAM itself (a container's limit included)."""
    total = host_ram_bytes()
    try:
        import psutil
    except ImportError:
        try:
            lines = open(meminfo, encoding="ascii").read().splitlines()  # noqa: SIM115 - one short read
        except OSError:
            return total
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        kib = fields.get("MemAvailable", "").split()
        return min(total, int(kib[0]) * 1024) if kib and kib[0].isdigit() else total
    return min(total, int(psutil.virtual_memory().available))


def cgroup_memory_limit(paths: Sequence[str] = CGROUP_MEMORY_LIMITS) -> int | None:
    """The cgroup (v2, else v1) memory limit in bytes, None when unlimited or unreadable."""
    for path in paths:
        try:
            text = open(path, encoding="ascii").read().strip()  # noqa: SIM115 - one short read
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 reports "unlimited" as a huge number
            return int(text)
        return None
    return None
