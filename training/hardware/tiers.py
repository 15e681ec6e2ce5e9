"""GPU tiers as data: one JSON file per tier in ``tiers/``, holding the machine and the defaults its users start from.

``nearest_tier`` matches a discovered machine to a tier (GPU name, count, memory, compute capability, link) and
says why; an unknown GPU still gets the closest tier by numbers. ``simulated_profile`` turns a tier back into a
``HardwareProfile`` so plans can be made for a machine you are not on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..vocabulary import ATTENTION_BACKENDS, LR_SCALINGS, MODES
from .discovery import BANDWIDTH_CLASSES, LINKS, GpuInfo, HardwareProfile
from .memory import GIB, MIB

logger = logging.getLogger(__name__)

TIERS_DIR = Path(__file__).with_name("tiers")


@dataclass(kw_only=True, frozen=True)
class Tier:
    """A machine class and its starting defaults. ``gpu_count`` 0 is the CPU tier."""

    name: str
    description: str
    gpu_name: str
    gpu_name_patterns: tuple[str, ...]
    gpu_count: int
    gpu_memory_mib: int
    compute_capability: tuple[int, int]
    bandwidth_class: str
    link: str
    nvlink_count: int
    p2p: bool
    cpu_cores: int
    ram_gib: int
    modes_allowed: tuple[str, ...]
    target_global_batch: int
    precision: str
    compile: bool
    attention_backend: str
    nccl_timeout_s: int
    lr_scaling: str
    safety_margin: float = 0.08
    nodes: int = 1  # machines, each as described above (gpu_count per node)
    inter_node_gbps: float | None = None  # GB/s per node's network interface; None: network.DEFAULT_INTER_NODE_GBPS

    def __post_init__(self) -> None:
        for name in ("gpu_name_patterns", "modes_allowed", "compute_capability"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.gpu_count >= 0, "gpu_count must be >= 0"),
            (self.gpu_count == 0 or self.gpu_memory_mib > 0, "gpu_memory_mib must be > 0 for a GPU tier"),
            (self.link in LINKS, f"link must be one of {LINKS}"),
            (self.bandwidth_class in BANDWIDTH_CLASSES, f"bandwidth_class must be one of {BANDWIDTH_CLASSES}"),
            (bool(self.modes_allowed) and set(self.modes_allowed) <= set(MODES), f"modes_allowed must be in {MODES}"),
            (self.target_global_batch >= 1, "target_global_batch must be >= 1"),
            (self.precision == "bf16", "precision must be 'bf16' (the only one the engine trains in)"),
            (self.attention_backend in ATTENTION_BACKENDS, f"attention_backend must be one of {ATTENTION_BACKENDS}"),
            (self.nccl_timeout_s > 0, "nccl_timeout_s must be > 0"),
            (self.lr_scaling in LR_SCALINGS, f"lr_scaling must be one of {LR_SCALINGS}"),
            (0 <= self.safety_margin < 0.5, "safety_margin must be in [0, 0.5)"),
            (isinstance(self.nodes, int) and self.nodes >= 1, "nodes must be an integer >= 1"),
            (self.nodes == 1 or self.gpu_count > 0, "a multi-node tier needs GPUs (gpu_count > 0)"),
            (self.inter_node_gbps is None or self.inter_node_gbps > 0, "inter_node_gbps must be > 0 (GB/s)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"tier {self.name!r}: {message}; fix tiers/{self.name}.json")

    @property
    def gpu_memory_bytes(self) -> int:
        return self.gpu_memory_mib * MIB

    def matches_gpu_name(self, name: str) -> str | None:
        """The pattern that names this GPU (whole words, so 'A10' does not match 'A100'), else None."""
        for pattern in self.gpu_name_patterns:
            if re.search(rf"(?<![\w]){re.escape(pattern)}(?![\w])", name, re.IGNORECASE):
                return pattern
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_tiers(directory: Path | str = TIERS_DIR) -> dict[str, Tier]:
    """Every ``*.json`` tier in ``directory``, keyed by name (which must equal the file's stem)."""
    tiers = {}
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text())
        tier = Tier(**data)
        if tier.name != path.stem:
            raise ValueError(f"tier file {path} names itself {tier.name!r}; rename the file or the tier")
        tiers[tier.name] = tier
    if not tiers:
        raise ValueError(f"no tier files (*.json) in {directory}")
    return tiers


def tier(name: str) -> Tier:
    tiers = load_tiers()
    if name not in tiers:
        raise ValueError(f"unknown tier {name!r}; choose one of {sorted(tiers)}")
    return tiers[name]


def simulated_profile(tier: Tier) -> HardwareProfile:
    """One machine (node) of a tier, idle (free = total memory), for planning off-device and for tests."""
    gpus = tuple(
        GpuInfo(
            name=tier.gpu_name,
            total_bytes=tier.gpu_memory_bytes,
            free_bytes=tier.gpu_memory_bytes,
            compute_capability=tier.compute_capability,
            fp8=tier.compute_capability >= (8, 9),
            bandwidth_class=tier.bandwidth_class,
        )
        for _ in range(tier.gpu_count)
    )
    return HardwareProfile(
        gpus=gpus,
        link=tier.link,
        nvlink_count=tier.nvlink_count,
        p2p=tier.p2p,
        cpu_cores=tier.cpu_cores,
        ram_bytes=tier.ram_gib * GIB,
        disk_free_bytes=1 << 40,
        source=f"simulated:{tier.name}",
    )


def nearest_tier(profile: HardwareProfile, tiers: dict[str, Tier] | None = None) -> tuple[Tier, str]:
    """The tier closest to ``profile`` and a sentence saying why. Distance: GPU count and memory on a log scale,
    compute capability, link kind; a tier that names the GPU wins ties. Multi-node tiers are never chosen: one
    machine cannot see the others, so planning for several nodes is always asked for (``--tier`` or ``--nodes``)."""
    tiers = tiers or load_tiers()
    if not profile.gpus:
        cpu = next(t for t in tiers.values() if t.gpu_count == 0)
        return cpu, f"no GPU found (source {profile.source}): CPU tier {cpu.name!r}"
    gpu_name = profile.gpus[0].name
    scored = sorted((_distance(t, profile), t.name) for t in tiers.values() if t.gpu_count > 0 and t.nodes == 1)
    best = tiers[scored[0][1]]
    reason = _reason(best, profile, best.matches_gpu_name(gpu_name))
    logger.info("tier: %s", reason)
    return best, reason


def _distance(tier: Tier, profile: HardwareProfile) -> float:
    gpu = profile.gpus[0]
    count = abs(math.log2(profile.gpu_count / tier.gpu_count))
    memory = abs(math.log2(gpu.total_bytes / tier.gpu_memory_bytes))
    capability = abs((gpu.compute_capability[0] + gpu.compute_capability[1] / 10) - _cc(tier))
    link = 0.0 if profile.link == tier.link or profile.gpu_count == 1 else 0.5
    name_bonus = -0.25 if tier.matches_gpu_name(gpu.name) else 0.0
    return 2.0 * count + 3.0 * memory + 0.5 * capability + link + name_bonus


def _cc(tier: Tier) -> float:
    return tier.compute_capability[0] + tier.compute_capability[1] / 10


def _reason(tier: Tier, profile: HardwareProfile, pattern: str | None) -> str:
    gpu = profile.gpus[0]
    named = (
        f"GPU {gpu.name!r} matches {pattern!r}"
        if pattern
        else f"no tier names GPU {gpu.name!r}, so the closest by count, memory and compute capability"
    )
    return (
        f"tier {tier.name!r}: {named}; {profile.gpu_count} GPU(s) vs {tier.gpu_count}, "
        f"{gpu.total_bytes / GIB:.1f} vs {tier.gpu_memory_bytes / GIB:.1f} GiB, "
        f"cc {gpu.compute_capability[0]}.{gpu.compute_capability[1]} vs {_cc(tier):.1f}, "
        f"link {profile.link} vs {tier.link}"
    )
