"""Tiny random-init encoder files in ComfyUI's layouts, for CPU tests of the packing encoders.

- `write_tiny_vae`: the Flux VAE's encoder (ComfyUI / original key names) with 4 levels (8x downsampling) and 32-64
  channels, its weights taken from diffusers' AutoencoderKL built from a tiny config (an independent definition of
  the architecture), so a test can compare the two;
- `write_tiny_tokenizer`: a byte-level BPE folder shaped like ComfyUI's qwen25_tokenizer (vocab.json, merges.txt,
  tokenizer_config.json with the chat tokens), small enough to build in milliseconds;
- `write_tiny_qwen3`: a Qwen3 text encoder with the key names of ComfyUI's qwen_3_4b.safetensors (as in
  tests/integration/model_fixtures.py's small Qwen3-4B) at test widths; hidden 32 = the tiny DiT's cap_feat_dim.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_VAE_CHANNELS = (32, 32, 64, 64)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGE_WORDS = ("the", "photo", "of", "a", "cat", "dog", "user", "assistant", "red", "blue")


def tiny_diffusers_vae(seed: int = 0):
    """diffusers' AutoencoderKL with the Flux VAE's structure at test widths, every parameter random."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=TINY_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(math.prod(param.shape[1:])))
    return model.eval()


def diffusers_to_flux(state: dict[str, torch.Tensor], *, decoder: bool = False) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the original / ComfyUI names (what ae.safetensors uses); encoder only unless
    `decoder`. diffusers numbers the decoder's up blocks from the lowest resolution, the original from the highest."""
    levels = len(TINY_VAE_CHANNELS)
    out = {}
    for name, tensor in state.items():
        half = name.split(".")[0]
        if half not in (("encoder", "decoder") if decoder else ("encoder",)):
            continue
        parts = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut").split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = parts[2] if half == "encoder" else str(levels - 1 - int(parts[2]))
            group = "down" if half == "encoder" else "up"
            if parts[3] == "resnets":
                parts = [half, group, level, "block", parts[4], *parts[5:]]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                parts = [half, group, level, "downsample" if half == "encoder" else "upsample", *parts[5:]]
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            parts = [half, "mid", f"block_{int(parts[3]) + 1}", *parts[4:]]
        elif parts[1] == "mid_block":
            layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
            parts = [half, "mid", "attn_1", layer, parts[-1]]
            if layer != "norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[".".join(parts)] = tensor.contiguous()
    return out


def write_tiny_vae(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    state = diffusers_to_flux(tiny_diffusers_vae(seed).state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
    return path


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 printable stand-ins byte-level BPE uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: Path) -> Path:
    """vocab.json (256 bytes + merges of a few words, with and without a leading space), merges.txt, config."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: index for index, char in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        for prefix in ("", "Ġ"):
            current = prefix + word[0] if prefix else word[0]
            if prefix and current not in vocab:
                merges.append((prefix, word[0]))
                vocab[current] = len(vocab)
            for char in word[1:]:
                if current + char not in vocab:
                    merges.append((current, char))
                    vocab[current + char] = len(vocab)
                current += char
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = {
        str(len(vocab) + index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for index, token in enumerate(SPECIAL_TOKENS)
    }  # fmt: skip
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "pad_token": "<|endoftext|>",
              "eos_token": "<|im_end|>", "bos_token": None, "unk_token": None, "add_prefix_space": False,
              "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
              "model_max_length": 131072}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_qwen3_state(
    *, vocab_size: int, hidden: int = 32, layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
    mlp: int = 64, seed: int = 0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Qwen3 weights under ComfyUI's key names; norms near 1, matrices ~ N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=generator)

    state = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden, generator=generator)}
    for index in range(layers):
        prefix = f"model.layers.{index}."
        state.update({
            prefix + "input_layernorm.weight": norm(hidden),
            prefix + "post_attention_layernorm.weight": norm(hidden),
            prefix + "self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            prefix + "self_attn.q_norm.weight": norm(head_dim),
            prefix + "self_attn.k_norm.weight": norm(head_dim),
            prefix + "mlp.gate_proj.weight": matrix(mlp, hidden),
            prefix + "mlp.up_proj.weight": matrix(mlp, hidden),
            prefix + "mlp.down_proj.weight": matrix(hidden, mlp),
        })  # fmt: skip
    state["model.norm.weight"] = norm(hidden)
    return state


def write_tiny_qwen3(path: Path, *, vocab_size: int, dtype: torch.dtype = torch.bfloat16, **shape) -> Path:
    state = tiny_qwen3_state(vocab_size=vocab_size, **shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path))
    return path


def tiny_encoder_files(folder: Path) -> dict[str, Path]:
    """A VAE file, a text encoder file and a tokenizer folder, laid out as in a ComfyUI installation."""
    tokenizer = write_tiny_tokenizer(folder / "comfy" / "text_encoders" / "qwen25_tokenizer")
    vocab_size = len(json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8"))) + len(SPECIAL_TOKENS)
    return {
        "vae": write_tiny_vae(folder / "models" / "vae" / "ae_tiny.safetensors"),
        "text_encoder": write_tiny_qwen3(folder / "models" / "text_encoders" / "qwen3_tiny.safetensors",
                                         vocab_size=vocab_size),
        "tokenizer": tokenizer,
    }  # fmt: skip
