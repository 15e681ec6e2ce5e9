"""What a data-parallel step sends across the node boundary, and how long that takes at a given bandwidth.

The planner plans one node's GPUs (memory is per GPU, so a node's plan holds on every node) and the whole job's
ranks (global batch, learning-rate scaling, FSDP shards). Across nodes the only new cost is the network: this module
states the bytes each node's network interface carries per optimizer step and the time at the inter-node bandwidth.

The model is NCCL's ring: an all-reduce of B bytes over W ranks moves 2·(W−1)/W·B through every link of the ring,
and every ring that spans nodes crosses each node boundary once in each direction, so each node's interface carries
about 2·(W−1)/W·B per all-reduce (the intra-node links are far faster and are not the bottleneck). An all-gather or a
reduce-scatter is half of that. What runs per optimizer step (the engine's `training/engine/parallelize.py`):

- DDP (LoRA, QLoRA): one all-reduce of the trainable gradients (fp32; ``no_sync`` on every micro-step but the last);
- FSDP2 (full fine-tune): per micro-step an all-gather of the bf16 weights in the forward, another in the backward
  (blocks are resharded after forward), and a reduce-scatter of the fp32 gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

#: GB/s per node when nobody says: one 100 Gb/s network interface per node, the common cloud baseline (AWS ENA
#: 100 Gb/s, Azure/GCP general-purpose nodes). InfiniBand HDR/NDR clusters have 25–50 GB/s per interface and often
#: one interface per GPU (8x that); pass the real figure with ``--inter-node-gbps``.
DEFAULT_INTER_NODE_GBPS = 12.5
DEFAULT_INTER_NODE_REASON = "default: one 100 Gb/s interface per node; pass --inter-node-gbps for your network"
BF16_BYTES, FP32_BYTES = 2, 4


@dataclass(kw_only=True, frozen=True)
class NodeTraffic:
    """Bytes each node's interface carries per optimizer step, and the seconds that takes at ``gbps``."""

    bytes_per_step: float
    gbps: float
    what: str

    @property
    def seconds_per_step(self) -> float:
        return self.bytes_per_step / (self.gbps * 1e9)

    def describe(self) -> str:
        return (
            f"{self.bytes_per_step / 1e9:.2f} GB per optimizer step through each node's interface ({self.what}); "
            f"{self.seconds_per_step * 1e3:.0f} ms at {self.gbps:g} GB/s"
        )


def ring_all_reduce_bytes(payload_bytes: float, world_size: int) -> float:
    return 2 * (world_size - 1) / world_size * payload_bytes


def inter_node_traffic(
    *, parallelism: str, trainable_params: int, total_params: int, world_size: int, grad_accum: int, gbps: float
) -> NodeTraffic:
    """The traffic of one optimizer step of a job whose ``world_size`` ranks span more than one node."""
    if world_size < 2:
        raise ValueError(f"inter_node_traffic needs world_size >= 2, got {world_size}")
    if not gbps > 0:
        raise ValueError(f"inter-node bandwidth must be > 0 GB/s, got {gbps!r}")
    if parallelism == "fsdp2":
        gathers = 2 * ring_all_reduce_bytes(total_params * BF16_BYTES, world_size) / 2
        scatter = ring_all_reduce_bytes(trainable_params * FP32_BYTES, world_size) / 2
        per_step = grad_accum * (gathers + scatter)
        what = f"FSDP2: 2 bf16 weight all-gathers and an fp32 gradient reduce-scatter per micro-step, x{grad_accum}"
    elif parallelism == "ddp":
        per_step = ring_all_reduce_bytes(trainable_params * FP32_BYTES, world_size)
        what = f"DDP: one all-reduce of {trainable_params / 1e6:.1f} M fp32 gradients"
    else:
        raise ValueError(f"parallelism {parallelism!r} does not cross nodes (expected 'ddp' or 'fsdp2')")
    return NodeTraffic(bytes_per_step=per_step, gbps=gbps, what=what)


def job_nodes(request, profile, tier) -> int:
    """Machines of the job: the request's, else the tier's (1 unless the tier describes several)."""
    nodes = request.nodes or tier.nodes
    if nodes > 1 and not profile.gpus:
        raise ValueError(f"PlanRequest.nodes {nodes}: a multi-node run needs GPUs; the CPU engine runs one process")
    return nodes


def plan_network(request, tier, setting, accum: int, trainable: int, decisions) -> int:
    """The job's node count; for several nodes, the bytes every node's interface carries per step (logged).
    ``trainable``: the job's trainable parameters (``MemoryModel.trainable_count``, which knows the adapter type)."""
    nodes = request.nodes or tier.nodes
    if nodes == 1:
        return 1
    if request.inter_node_gbps is not None:
        gbps, source = request.inter_node_gbps, "requested"
    elif tier.inter_node_gbps is not None:
        gbps, source = tier.inter_node_gbps, f"tier {tier.name}"
    else:
        gbps, source = DEFAULT_INTER_NODE_GBPS, DEFAULT_INTER_NODE_REASON
    decisions.add("inter_node_gbps", gbps, source)
    traffic = inter_node_traffic(
        parallelism=setting.parallelism,
        trainable_params=trainable,
        total_params=request.model.total_params(),
        world_size=setting.world_size,
        grad_accum=accum,
        gbps=gbps,
    )
    decisions.add("inter_node_s_per_step", round(traffic.seconds_per_step, 3), traffic.describe())
    return nodes
