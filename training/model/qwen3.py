"""Z-Image's text encoder: Qwen3 (4B in the release) read from ComfyUI's text_encoders file, computed as ComfyUI does.

ComfyUI 0.8 (comfy/text_encoders/z_image.py, llama.py, sd1_clip.py) encodes a Z-Image prompt as the hidden state after
layer index num_layers-2 (`layer_idx=-2`: the second-to-last layer's output, no final norm), for every token of the
chat-templated prompt up to the first pad token. Weights stay in the file's dtype (bf16) and every operation runs in
float32 (ComfyUI's TE upcast: embeddings are taken as float32 and manual_cast casts each weight to the input dtype).
RMSNorm eps 1e-6, RoPE theta 1e6 (rotate-half), q/k RMSNorm per head, grouped-query attention, SwiGLU MLP. Only the
layers up to the one read are loaded, so the last layer and the final norm never occupy memory.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .encoder_files import fingerprint, load_tensors, pick_device, read_file_sources
from .qwen_tokenizer import ZImageTokenizer, find_tokenizer
from .safetensors_io import WeightsError

logger = logging.getLogger(__name__)

RMS_NORM_EPS = 1e-6
ROPE_THETA = 1_000_000.0
#: ComfyUI's Qwen3_4BModel(layer="hidden", layer_idx=-2).
HIDDEN_LAYER_FROM_END = 2
PREFIX = "model."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_QUANTIZED_MARKERS = ("weight_scale", "scale_weight", "comfy_quant", "input_scale")
_WHAT_TO_DO = "pick Z-Image's text encoder: ComfyUI's models/text_encoders/qwen_3_4b.safetensors (bf16)"


@dataclass(frozen=True, kw_only=True)
class Qwen3Shape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int

    @classmethod
    def from_file(cls, shapes: dict[str, tuple[int, ...]], path) -> Qwen3Shape:
        quantized = [k for k in shapes if any(marker in k for marker in _QUANTIZED_MARKERS)]
        if quantized:
            raise WeightsError(f"{path} is a quantized (fp8 scaled) text encoder ({quantized[0]}); {_WHAT_TO_DO}")
        layer_ids = {int(m[1]) for m in map(_LAYER.match, shapes) if m}
        needed = [f"{PREFIX}embed_tokens.weight"] + [f"{PREFIX}layers.0.{key}" for key in _LAYER_KEYS]
        missing = [key for key in needed if key not in shapes]
        if missing or not layer_ids:
            raise WeightsError(f"{path} is not a Qwen3 text encoder (missing {', '.join(missing[:3])}); {_WHAT_TO_DO}")
        layers = max(layer_ids) + 1
        if sorted(layer_ids) != list(range(layers)) or layers < HIDDEN_LAYER_FROM_END:
            raise WeightsError(f"{path}: layers {sorted(layer_ids)} are not 0..N-1 with N >= 2; the file is damaged")
        vocab_size, hidden = shapes[f"{PREFIX}embed_tokens.weight"]
        (head_dim,) = shapes[f"{PREFIX}layers.0.self_attn.q_norm.weight"]
        first = f"{PREFIX}layers.0."
        return cls(
            vocab_size=vocab_size,
            hidden=hidden,
            layers=layers,
            heads=shapes[first + "self_attn.q_proj.weight"][0] // head_dim,
            kv_heads=shapes[first + "self_attn.k_proj.weight"][0] // head_dim,
            head_dim=head_dim,
            mlp=shapes[first + "mlp.gate_proj.weight"][0],
        )

    @property
    def used_layers(self) -> int:
        """Layers run to reach the hidden state Z-Image reads (all but the last)."""
        return self.layers - HIDDEN_LAYER_FROM_END + 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen3Hidden:
    """The Qwen3 stack up to Z-Image's layer: token ids -> float32 hidden states [B, L, hidden]."""

    def __init__(self, shape: Qwen3Shape, state: dict[str, torch.Tensor]) -> None:
        self.shape = shape
        self.state = state

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device) -> Qwen3Hidden:
        sources = read_file_sources(path, "text encoder")
        shape = Qwen3Shape.from_file({key: source.shape for key, source in sources.items()}, path)
        names = {"embed": f"{PREFIX}embed_tokens.weight"}
        for index in range(shape.used_layers):
            names.update({f"{index}.{key}": f"{PREFIX}layers.{index}.{key}" for key in _LAYER_KEYS})
        logger.info(
            "text encoder %s: Qwen3 with %d layers (hidden %d, %d/%d heads of %d); reading the output of layer %d",
            path, shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.used_layers - 1,
        )  # fmt: skip
        return cls(shape, load_tensors(sources, names, device=device))

    @property
    def device(self) -> torch.device:
        return self.state["embed"].device

    def _rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.shape.head_dim
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=self.device).float() / dim))
        freqs = torch.arange(length, device=self.device).float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos()[None, None], angles.sin()[None, None]

    def _mask(self, lengths: list[int], length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.device)
        allowed = positions[None, :] <= positions[:, None]  # causal
        valid = positions[None, :] < torch.tensor(lengths, device=self.device)[:, None]  # [B, L] keys
        allowed = allowed[None] & valid[:, None, :]
        mask = torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, float("-inf"))
        return mask[:, None]

    def _layer(self, x: torch.Tensor, index: int, rope, mask: torch.Tensor) -> torch.Tensor:
        weight = {key: self.state[f"{index}.{key}"].float() for key in _LAYER_KEYS}
        shape, (batch, length, _) = self.shape, x.shape
        h = F.rms_norm(x, (shape.hidden,), weight["input_layernorm.weight"], RMS_NORM_EPS)
        q = F.linear(h, weight["self_attn.q_proj.weight"]).view(batch, length, shape.heads, -1).transpose(1, 2)
        k = F.linear(h, weight["self_attn.k_proj.weight"]).view(batch, length, shape.kv_heads, -1).transpose(1, 2)
        v = F.linear(h, weight["self_attn.v_proj.weight"]).view(batch, length, shape.kv_heads, -1).transpose(1, 2)
        q = F.rms_norm(q, (shape.head_dim,), weight["self_attn.q_norm.weight"], RMS_NORM_EPS)
        k = F.rms_norm(k, (shape.head_dim,), weight["self_attn.k_norm.weight"], RMS_NORM_EPS)
        cos, sin = rope
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        group = shape.heads // shape.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(shape.head_dim))
        x = x + F.linear(attended.transpose(1, 2).reshape(batch, length, -1), weight["self_attn.o_proj.weight"])
        h = F.rms_norm(x, (shape.hidden,), weight["post_attention_layernorm.weight"], RMS_NORM_EPS)
        gated = F.silu(F.linear(h, weight["mlp.gate_proj.weight"])) * F.linear(h, weight["mlp.up_proj.weight"])
        return x + F.linear(gated, weight["mlp.down_proj.weight"])

    @torch.no_grad()
    def hidden_states(self, batch_ids: list[list[int]], pad_id: int) -> torch.Tensor:
        """[B, Lmax, hidden] float32; rows past a sequence's length are padding (their values are meaningless)."""
        lengths = [len(ids) for ids in batch_ids]
        too_big = [i for ids in batch_ids for i in ids if not 0 <= i < self.shape.vocab_size]
        if too_big:
            raise ValueError(
                f"token id {too_big[0]} is outside the text encoder's vocabulary ({self.shape.vocab_size})"
            )
        length = max(lengths)
        ids = torch.full((len(batch_ids), length), pad_id, dtype=torch.long)
        for row, sequence in enumerate(batch_ids):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        x = F.embedding(ids.to(self.device), self.state["embed"]).float()
        rope, mask = self._rope(length), self._mask(lengths, length)
        for index in range(self.shape.used_layers):
            x = self._layer(x, index, rope, mask)
        return x


class Qwen3TextEncoder:
    """The packer's TextEncoder for Z-Image: captions -> [tokens, hidden] float32 features, as ComfyUI computes them."""

    def __init__(self, path: str | Path, *, tokenizer: str | Path | None = None, device: str = "auto") -> None:
        self.tokenizer = ZImageTokenizer.load(find_tokenizer(tokenizer, path))
        self.model = Qwen3Hidden.load(path, device=pick_device(device))
        if self.tokenizer.vocab_size > self.model.shape.vocab_size:
            logger.info(
                "tokenizer has %d ids, the text encoder's table %d (ids beyond it are refused when met)",
                self.tokenizer.vocab_size, self.model.shape.vocab_size,
            )  # fmt: skip
        self.feature_dim = self.model.shape.hidden
        weights = fingerprint(self.model.state)
        self.identity = (
            f"qwen3:{self.model.shape.layers}x{self.model.shape.hidden}:{weights}:tokenizer-{self.tokenizer.digest}:"
            f"hidden[-{HIDDEN_LAYER_FROM_END}]:fp32"
        )

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        if not captions:
            return []
        batch_ids = [self.tokenizer.token_ids(caption) for caption in captions]
        hidden = self.model.hidden_states(batch_ids, self.tokenizer.pad_id).cpu()
        return [hidden[row, : len(ids)].contiguous() for row, ids in enumerate(batch_ids)]
