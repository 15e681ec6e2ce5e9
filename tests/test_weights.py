"""Weight loading and saving: both published layouts, detection, config inference, memory, atomic saves."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from model_helpers import randomize, to_diffusers_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

from training.model.config import PRESETS, ZImageConfig
from training.model.layouts import diffusers_names
from training.model.weights import (
    WeightsError,
    detect_layout,
    infer_config,
    load_transformer,
    read_header,
    read_state_dict,
    save_weights,
)
from training.model.zimage import ZImageTransformer

FULL_PARAMS = 6_154_908_736


def meta_model(config: ZImageConfig) -> ZImageTransformer:
    with torch.device("meta"):
        return ZImageTransformer(config)


def shapes_of(state) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def read_file(path) -> dict[str, torch.Tensor]:
    """The reference reader (safetensors itself), so our writer and reader are checked against it."""
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), name


@pytest.fixture(scope="module")
def tiny() -> ZImageTransformer:
    model = ZImageTransformer(PRESETS["tiny"]).float()
    randomize(model, seed=3)
    return model


# --------------------------------------------------------------------------------------------------------------------
# The full model's keys and shapes, on the meta device


def comfy_keys_from_doc() -> dict[str, tuple[int, ...]]:
    """zimage.md §3, written out by hand."""
    d, h, qkv, adaln = 3840, 10240, 11520, 15360
    block = {
        "attention.qkv.weight": (qkv, d),
        "attention.out.weight": (d, d),
        "attention.q_norm.weight": (128,),
        "attention.k_norm.weight": (128,),
        "feed_forward.w1.weight": (h, d),
        "feed_forward.w3.weight": (h, d),
        "feed_forward.w2.weight": (d, h),
        "attention_norm1.weight": (d,),
        "attention_norm2.weight": (d,),
        "ffn_norm1.weight": (d,),
        "ffn_norm2.weight": (d,),
    }
    modulation = {"adaLN_modulation.0.weight": (adaln, 256), "adaLN_modulation.0.bias": (adaln,)}
    keys = {
        "x_embedder.weight": (d, 64),
        "x_embedder.bias": (d,),
        "final_layer.linear.weight": (64, d),
        "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (d, 256),
        "final_layer.adaLN_modulation.1.bias": (d,),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.0.bias": (1024,),
        "t_embedder.mlp.2.weight": (256, 1024),
        "t_embedder.mlp.2.bias": (256,),
        "cap_embedder.0.weight": (2560,),
        "cap_embedder.1.weight": (d, 2560),
        "cap_embedder.1.bias": (d,),
        "x_pad_token": (1, d),
        "cap_pad_token": (1, d),
    }
    for prefix, count, modulated in (("layers", 30, True), ("noise_refiner", 2, True), ("context_refiner", 2, False)):
        for i in range(count):
            keys.update({f"{prefix}.{i}.{k}": s for k, s in (block | (modulation if modulated else {})).items()})
    return keys


def test_full_preset_on_meta_has_the_published_parameter_count():
    model = meta_model(PRESETS["z-image"])
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS == PRESETS["z-image"].total_params()
    assert all(p.is_meta for p in model.parameters())


def test_full_preset_has_every_comfy_key_and_shape():
    assert shapes_of(meta_model(PRESETS["z-image"]).state_dict()) == comfy_keys_from_doc()


def test_full_preset_has_every_diffusers_key_and_shape():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        reference = shapes_of(ZImageTransformer2DModel().state_dict())  # default config = the published model
    ours = {}
    for name, shape in shapes_of(meta_model(PRESETS["z-image"]).state_dict()).items():
        targets = diffusers_names(name)
        ours.update({t: (shape[0] // len(targets), *shape[1:]) for t in targets})
    assert ours == reference


@pytest.mark.parametrize("preset", ["z-image", "tiny"])
@pytest.mark.parametrize("layout", ["comfy", "comfy-prefixed", "diffusers"])
def test_infer_config_from_keys_and_shapes(preset, layout):
    shapes = shapes_of(meta_model(PRESETS[preset]).state_dict())
    if layout == "comfy-prefixed":
        shapes = {f"model.diffusion_model.{k}": s for k, s in shapes.items()}
    elif layout == "diffusers":
        shapes = {t: (s[0] // len(diffusers_names(k)), *s[1:]) for k, s in shapes.items() for t in diffusers_names(k)}
    assert infer_config(shapes) == PRESETS[preset]


def test_infer_config_rejects_other_models():
    with pytest.raises(WeightsError, match="cap_embedder.1.weight"):
        infer_config({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})


# --------------------------------------------------------------------------------------------------------------------
# Round trips (tiny preset, random weights)


@pytest.mark.parametrize("prefix", [False, True])
def test_comfy_round_trip(tiny, tmp_path, prefix):
    path = save_weights(tiny, tmp_path / "model.safetensors", prefix=prefix, metadata={"note": "hi"})
    key = "model.diffusion_model." if prefix else ""
    assert_same_tensors(read_file(path), {key + k: v for k, v in tiny.state_dict().items()})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "hi"}

    loaded = load_transformer(path, dtype=torch.float32)  # config inferred
    assert loaded.config == PRESETS["tiny"]
    assert_same_tensors(loaded.state_dict(), tiny.state_dict())
    again = save_weights(loaded, tmp_path / "again.safetensors", prefix=prefix)
    assert_same_tensors(read_file(again), read_file(path))


def test_diffusers_round_trip_single_file(tiny, tmp_path):
    expected = to_diffusers_state_dict(tiny.state_dict())  # split by the parity-test helper, not by weights.py
    path = save_weights(tiny, tmp_path / "transformer", layout="diffusers")
    assert path == tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    assert_same_tensors(read_file(path), expected)
    for source in (path, tmp_path / "transformer", tmp_path):  # the file, the transformer/ folder, the pipeline
        assert_same_tensors(load_transformer(source, dtype=torch.float32).state_dict(), tiny.state_dict())


def test_diffusers_round_trip_sharded(tiny, tmp_path):
    expected = to_diffusers_state_dict(tiny.state_dict())
    index = save_weights(tiny, tmp_path, layout="diffusers", shard_size=60_000)
    assert index.name == "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(weight_map) == sorted(expected)
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and all(
        re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", s) for s in shards
    )
    on_disk = {}
    for shard in shards:
        tensors = read_file(tmp_path / shard)
        assert all(weight_map[name] == shard for name in tensors)
        on_disk.update(tensors)
    assert_same_tensors(on_disk, expected)
    for source in (index, tmp_path, [tmp_path / s for s in shards]):
        assert_same_tensors(load_transformer(source, dtype=torch.float32).state_dict(), tiny.state_dict())

    single = save_weights(tiny, tmp_path, layout="diffusers")  # re-saving unsharded removes the old shards
    assert sorted(p.name for p in tmp_path.iterdir()) == [single.name]


def test_reads_files_written_by_safetensors_itself(tiny, tmp_path):
    path = tmp_path / "reference.safetensors"
    save_file(to_diffusers_state_dict(tiny.state_dict()), str(path))
    state = read_state_dict(path)
    assert_same_tensors(state, tiny.state_dict())
    assert read_state_dict(path, dtype=torch.float16)["x_embedder.weight"].dtype == torch.float16


def test_default_load_is_bf16_and_equals_a_cast(tiny, tmp_path):
    path = save_weights(tiny, tmp_path / "model.safetensors")
    loaded = load_transformer(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    cast = {k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()}
    assert_same_tensors(loaded.state_dict(), cast)


# --------------------------------------------------------------------------------------------------------------------
# Detection and errors


def test_detect_layout():
    assert detect_layout(["layers.0.attention.qkv.weight", "x_embedder.weight"]) == "comfy"
    assert detect_layout(["model.diffusion_model.layers.0.attention.qkv.weight"]) == "comfy"
    assert detect_layout(["layers.0.attention.to_q.weight", "all_x_embedder.2-1.weight"]) == "diffusers"


def test_full_checkpoint_loads_the_diffusion_model_only(tiny, tmp_path):
    state = {f"model.diffusion_model.{k}": v for k, v in tiny.state_dict().items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.ones(8, 16, 3, 3)
    state["text_encoders.qwen3_4b.transformer.model.embed_tokens.weight"] = torch.ones(10, 32)
    state["model.diffusion_model.norm_final.weight"] = torch.ones(64)  # unused leftover in some releases
    save_file(state, str(tmp_path / "checkpoint.safetensors"))
    loaded = load_transformer(tmp_path / "checkpoint.safetensors", dtype=torch.float32)
    assert_same_tensors(loaded.state_dict(), tiny.state_dict())


@pytest.mark.parametrize(
    "keys",
    [
        {  # SDXL-like UNet
            "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            "model.diffusion_model.time_embed.0.weight": (1280, 320),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        },
        {  # Flux-like DiT
            "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
            "img_in.weight": (3072, 64),
            "time_in.in_layer.weight": (3072, 256),
        },
    ],
    ids=["sdxl", "flux"],
)
def test_other_models_are_refused_with_a_summary(tmp_path, keys):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(WeightsError) as error:
        load_transformer(path)
    message = str(error.value)
    assert str(path) in message and "not a Z-Image transformer" in message
    assert re.search(r"\d+ missing: ", message) and "more" in message  # first few, then a count
    assert re.search(r"\d+ unexpected: ", message)
    assert "diffusers transformer/ folder" in message  # says what to do


def test_z_image_of_another_size_than_the_config_is_refused(tiny, tmp_path):
    path = save_weights(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(WeightsError) as error:
        load_transformer(path, config=PRESETS["z-image"])  # builds the 6B model on meta only
    message = str(error.value)
    assert str(path) in message and "shape-mismatched: " in message and "missing: " in message
    assert "The file holds Z-Image with dim=64, n_layers=2, n_refiner_layers=1: load it without `config`" in message


def test_incomplete_file_names_the_missing_keys(tiny, tmp_path):
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("layers.1.feed_forward")}
    path = save_weights(state, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=r"3 missing: layers\.1\.feed_forward"):
        load_transformer(path, config=PRESETS["tiny"])


def test_split_qkv_must_be_complete(tiny, tmp_path):
    state = to_diffusers_state_dict(tiny.state_dict())
    del state["layers.0.attention.to_k.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsError, match="layers.0.attention.qkv.weight has q/k/v parts 'qv'"):
        read_state_dict(tmp_path / "partial.safetensors")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "pytorch_model.bin", "model.pth"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, monkeypatch, name):
    (tmp_path / name).write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(WeightsError, match="pickle checkpoints are refused"):
        load_transformer(tmp_path / name)


def test_non_safetensors_and_missing_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="junk.safetensors is not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_transformer(tmp_path / "nope.safetensors")


def test_truncated_file_is_reported(tiny, tmp_path):
    path = save_weights(tiny, tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="bad byte range"):
        load_transformer(path)


# --------------------------------------------------------------------------------------------------------------------
# Saving


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    path = save_weights(tiny, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails once every byte went to the temp file
    with pytest.raises(OSError, match="No space left"):
        save_weights({k: v + 1 for k, v in tiny.state_dict().items()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_meta_tensors_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="'x_pad_token': it is on the meta device"):
        save_weights(meta_model(PRESETS["tiny"]), tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "sd"},
        {"layout": "comfy", "shard_size": 10},
        {"layout": "diffusers", "prefix": True},
        {"metadata": {"step": 3}},
    ],
)
def test_bad_save_arguments(tiny, tmp_path, kwargs):
    with pytest.raises(ValueError):
        save_weights(tiny, tmp_path / "model.safetensors", **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Memory


def test_loading_holds_one_copy_plus_one_tensor(tmp_path):
    """A ~180 MB float32 file loaded as bf16: the peak of live torch allocations stays near the bf16 model size.

    Counting allocator bytes (profiler memory events) is deterministic, unlike RSS, which glibc's caching and the
    page cache blur. A CPU-built model or a full float32 state dict would show up as ≥ 3× the bf16 size."""
    config = ZImageConfig(dim=512, n_layers=10, n_refiner_layers=1, n_heads=4, ffn_hidden_dim=1365, cap_feat_dim=256)
    shapes = shapes_of(meta_model(config).state_dict())
    path = save_weights({k: torch.full(s, 0.5) for k, s in shapes.items()}, tmp_path / "big.safetensors")
    bf16_bytes = 2 * sum(torch.Size(s).numel() for s in shapes.values())
    assert path.stat().st_size > 170e6

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = load_transformer(path)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    assert model.x_embedder.weight.dtype == torch.bfloat16
    assert bf16_bytes <= peak < 1.25 * bf16_bytes  # the lower bound proves the profiler saw the model
