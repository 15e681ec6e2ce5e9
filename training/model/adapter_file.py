"""DoRA, LoKr and LoHa in the ``.safetensors`` key form ComfyUI 0.8's ``comfy.weight_adapter`` loads, fused qkv
included, and reading such files back (our names) or applying them the way ComfyUI does.

Keys under ``diffusion_model.<diffusers module>``, as ComfyUI's Lumina2 key map names them:
    dora  .lora_A.weight [r, in], .lora_B.weight [out, r], .alpha, .dora_scale [out, 1] (``adapters.comfy_dora_scale``)
    lokr  .lokr_w1 [out_l, in_m], .lokr_w2 [out_k, in_n] or .lokr_w2_a [out_k, r] + .lokr_w2_b [r, in_n], .alpha
    loha  .hada_w1_a [out, r], .hada_w1_b [r, in], .hada_w2_a [out, r], .hada_w2_b [r, in], .alpha

Our fused ``attention.qkv`` [3d, d] becomes to_q/to_k/to_v, which ComfyUI patches at rows 0/d/2d, each slice exact:
    dora  A shared, B and dora_scale split by rows (DoRA's scale is per output row);
    loha  (w1_a@w1_b) ⊙ (w2_a@w2_b) restricted to rows = (w1_a[rows]@w1_b) ⊙ (w2_a[rows]@w2_b): the two "a" split;
    lokr  row R of kron(w1, w2) is row R // out_k of w1 and R % out_k of w2, so when out_k divides d each third is
          kron(w1[rows/out_k], w2); the qkv trains with ``targets.lokr_decompose_factor``, which makes each third
          a LoKr of a [d, d] linear's default shape (diffusers re-derives it, so this file loads there too).
ComfyUI scales LoKr by alpha / rank only when a factor is rank-decomposed; a LoKr of two full matrices has the
scale folded into w1 and no alpha key, which is also how diffusers reads LoKr alphas.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .adapters import COMFY_NORM_EPS, DORA_SCALE
from .layouts import comfy_name, diffusers_names
from .safetensors_io import host_copy

#: Per type, the file endings (after the module name) and whether each is split by rows on a fused qkv.
FILE_KINDS: dict[str, dict[str, bool]] = {
    "dora": {"lora_A.weight": False, "lora_B.weight": True, DORA_SCALE: True},
    "lokr": {"lokr_w1": True, "lokr_w2": False, "lokr_w2_a": False, "lokr_w2_b": False},
    "loha": {"hada_w1_a": True, "hada_w1_b": False, "hada_w2_a": True, "hada_w2_b": False},
}
ALPHA = "alpha"
_STATE_KIND = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}  # file ending → our kind (else the same)


def file_ending(adapter: str, kind: str) -> str:
    return next(ending for ending in FILE_KINDS[adapter] if _STATE_KIND.get(ending, ending) == kind)


def _modules(state: dict[str, torch.Tensor], adapter: str) -> dict[str, dict[str, torch.Tensor]]:
    """Our state → module → {kind: tensor}, checking every key is a tensor this type saves."""
    kinds = {_STATE_KIND.get(ending, ending) for ending in FILE_KINDS[adapter]}
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        module, _, kind = key.removesuffix(".weight").rpartition(".")
        if kind not in kinds or not key.endswith(".weight"):
            raise ValueError(f"{adapter} state key {key!r} is not one of '<module>.<kind>.weight' for {sorted(kinds)}")
        modules[module][kind] = tensor
    return modules


def _scale(settings) -> float:
    return settings.effective_alpha / settings.rank


def file_tensors(state: dict[str, torch.Tensor], settings, dtype: torch.dtype, prefix: str) -> dict:
    """Our state (``lora.adapter_file_state``) → the file's tensors for a DoRA, LoKr or LoHa adapter."""
    adapter = settings.adapter
    tensors = {}
    for module, parts in _modules(state, adapter).items():
        parts = dict(parts)
        has_alpha = True
        if adapter == "lokr" and "lokr_w2_a" not in parts:  # two full factors: ComfyUI applies no alpha
            parts["lokr_w1"] = parts["lokr_w1"].float() * _scale(settings)
            has_alpha = False
        targets = [name.removesuffix(".weight") for name in diffusers_names(f"{module}.weight")]
        for index, target in enumerate(targets):
            key = prefix + target
            for kind, tensor in parts.items():
                ending = file_ending(adapter, kind)
                if FILE_KINDS[adapter][ending] and len(targets) > 1:
                    if tensor.shape[0] % len(targets):
                        raise ValueError(f"{adapter} {module}.{kind}: {tensor.shape[0]} rows do not split in q/k/v")
                    tensor = tensor.chunk(len(targets), dim=0)[index]
                out_dtype = torch.float32 if ending == DORA_SCALE else dtype  # a per-row scale near 1: keep it exact
                tensors[f"{key}.{ending}"] = host_copy(tensor, out_dtype)
            if has_alpha:
                tensors[f"{key}.{ALPHA}"] = torch.tensor(settings.effective_alpha, dtype=torch.float32)
    return tensors


def detect_adapter(keys) -> str:
    """The adapter type a file's keys hold: 'loha', 'lokr', 'dora' or 'lora'."""
    keys = list(keys)
    for adapter, marker in (("loha", ".hada_"), ("lokr", ".lokr_"), ("dora", f".{DORA_SCALE}")):
        if any(marker in key for key in keys):
            return adapter
    return "lora"


def group_file(tensors: dict[str, torch.Tensor], adapter: str, prefixes, origin: str) -> dict[str, dict]:
    """File keys → file module (prefix stripped) → {ending: tensor}; every key must belong to ``adapter``."""
    endings = sorted((*FILE_KINDS[adapter], ALPHA), key=len, reverse=True)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        ending = next((e for e in endings if key.endswith(f".{e}")), None)
        if prefix is None or ending is None:
            unknown.append(key)
            continue
        modules[key[len(prefix) : -len(ending) - 1]][ending] = tensor
    if unknown:
        raise ValueError(
            f"{origin}: {len(unknown)} keys are not {adapter} tensors under {list(prefixes)}: {sorted(unknown)[:5]}"
        )
    for module, parts in modules.items():
        _check_complete(adapter, module, parts, origin)
    return modules


def _check_complete(adapter: str, module: str, parts: dict[str, torch.Tensor], origin: str) -> None:
    has = set(parts)
    if adapter == "lokr":
        complete = "lokr_w1" in has and ("lokr_w2" in has) != ({"lokr_w2_a", "lokr_w2_b"} <= has)
        needs = "lokr_w1 and either lokr_w2 or lokr_w2_a + lokr_w2_b"
    else:
        complete, needs = set(FILE_KINDS[adapter]) <= has, " + ".join(FILE_KINDS[adapter])
    if not complete:
        raise ValueError(f"{origin}: {adapter} module {module!r} has {sorted(has)}; it needs {needs}")


def _rank_of(adapter: str, parts: dict[str, torch.Tensor]) -> int | None:
    if adapter == "dora":
        return parts["lora_A.weight"].shape[0]
    if adapter == "loha":
        return parts["hada_w1_b"].shape[0]
    return parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else None


def fuse_file(modules: dict[str, dict], adapter: str, metadata: dict[str, str], origin: str):
    """File modules → (our state, rank, alpha): to_q/to_k/to_v rejoined by rows, shared parts checked equal."""
    grouped: dict[str, list[tuple[int | None, dict]]] = defaultdict(list)
    for module, parts in modules.items():
        target, third = comfy_name(f"{module}.weight")
        grouped[target.removesuffix(".weight")].append((third, parts))
    state, ranks, alphas = {}, set(), set()
    for module, pieces in grouped.items():
        pieces.sort(key=lambda piece: -1 if piece[0] is None else piece[0])
        if len(pieces) > 1 and [third for third, _ in pieces] != [0, 1, 2]:
            raise ValueError(f"{origin}: {module} needs exactly to_q, to_k and to_v to rebuild the fused qkv")
        first = pieces[0][1]
        if any(set(parts) != set(first) for _, parts in pieces):
            raise ValueError(f"{origin}: to_q/to_k/to_v of {module} hold different {adapter} tensors")
        for ending in first:
            if ending == ALPHA:
                continue
            values = [parts[ending] for _, parts in pieces]
            if FILE_KINDS[adapter][ending]:
                tensor = torch.cat(values) if len(values) > 1 else values[0]
            elif all(torch.equal(values[0], v) for v in values[1:]):
                tensor = values[0]
            else:
                raise ValueError(f"{origin}: to_q/to_k/to_v of {module} have different {ending}; not our fused form")
            state[f"{module}.{_STATE_KIND.get(ending, ending)}.weight"] = tensor
        ranks.add(_rank_of(adapter, first))
        alphas.add(float(first[ALPHA].float().item()) if ALPHA in first else None)
    return state, ranks, alphas


def unfold_lokr_scale(state: dict[str, torch.Tensor], scale: float) -> None:
    """Undo the scale ``file_tensors`` folded into w1 of full-factor LoKr modules (in place)."""
    for key in [k for k in state if k.endswith(".lokr_w1.weight")]:
        if key.replace(".lokr_w1.weight", ".lokr_w2_a.weight") not in state:
            state[key] = state[key].float() / scale


def comfy_patch(weight: torch.Tensor, adapter: str, parts: dict, strength: float) -> torch.Tensor:
    """``weight`` (float32, one slice) patched as ComfyUI 0.8's weight_adapter does for one file module."""
    alpha = float(parts[ALPHA].float().item()) if ALPHA in parts else None
    f = {k: v.float() for k, v in parts.items()}
    if adapter == "dora":
        diff, dim = f["lora_B.weight"] @ f["lora_A.weight"], f["lora_A.weight"].shape[0]
    elif adapter == "loha":
        diff, dim = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]), f["hada_w1_b"].shape[0]
    else:
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        diff, dim = torch.kron(f["lokr_w1"], w2), (f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else None)
    factor = alpha / dim if alpha is not None and dim is not None else 1.0
    diff = diff.reshape(weight.shape)
    if adapter != "dora":
        return weight + strength * factor * diff
    merged = weight + factor * diff
    norm = torch.linalg.norm(weight, dim=1, keepdim=True) + COMFY_NORM_EPS
    merged = merged * (f[DORA_SCALE] / norm)
    return weight + strength * (merged - weight)
