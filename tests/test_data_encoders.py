"""The packing encoders against independent references: the Flux VAE encoder vs diffusers' AutoencoderKL, the Qwen3
text encoder vs transformers' Qwen3Model, the tokenizer vs transformers' Qwen2Tokenizer (ComfyUI's tokenizer class),
plus ComfyUI's prompt handling (template, escapes, embedding syntax, pad-token mask) and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.encoder_fixtures import (
    SPECIAL_TOKENS,
    diffusers_to_flux,
    tiny_diffusers_vae,
    tiny_encoder_files,
    tiny_qwen3_state,
    write_tiny_qwen3,
    write_tiny_tokenizer,
    write_tiny_vae,
)
from training.model.flux_vae import FLUX_SCALE, FLUX_SHIFT, FluxLatentEncoder
from training.model.qwen3 import Qwen3TextEncoder
from training.model.qwen_tokenizer import CHAT_TEMPLATE, TokenizerNotFound, ZImageTokenizer, find_tokenizer
from training.model.safetensors_io import WeightsError

CAPTIONS = ["a photo of the cat", "", "Ünïcödé café, 12345!!\n\ttabs", "the red dog <|im_end|> and more", "日本語"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_vae_encoder_matches_diffusers_autoencoderkl(tmp_path):
    reference = tiny_diffusers_vae(seed=3)
    path = tmp_path / "ae.safetensors"
    save_file(diffusers_to_flux(reference.state_dict()), str(path))
    encoder = FluxLatentEncoder(path, device="cpu")
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.encode(pixels * 2 - 1).latent_dist.mode()
    assert relative(encoder.model.raw_latents(pixels), expected) < 1e-5
    latents = encoder.encode(pixels)
    assert latents.shape == (2, 16, 8, 6) and latents.dtype == torch.float32
    assert relative(latents, (expected - FLUX_SHIFT) * FLUX_SCALE) < 1e-5
    assert encoder.identity.startswith("flux-vae:") and "float32" in encoder.identity


def test_vae_decoder_matches_diffusers_autoencoderkl(tmp_path):
    from training.model.flux_vae import FluxVAE

    reference = tiny_diffusers_vae(seed=4)
    path = tmp_path / "ae.safetensors"
    save_file(diffusers_to_flux(reference.state_dict(), decoder=True), str(path))
    vae = FluxVAE.load(path, device=torch.device("cpu"), dtype=torch.float32, decoder=True)
    latents = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ((reference.decode(latents / FLUX_SCALE + FLUX_SHIFT).sample + 1) / 2).clamp(0, 1)
    pixels = vae.decode(latents)
    assert pixels.shape == (2, 3, 48, 40) and relative(pixels, expected) < 1e-5
    encoder_only = FluxVAE.load(path, device=torch.device("cpu"), dtype=torch.float32)
    assert not any(name.startswith("decoder.") for name in encoder_only.state)
    with pytest.raises(ValueError, match="without its decoder"):
        encoder_only.decode(latents)


def test_vae_identity_tells_weights_apart(tmp_path):
    first = FluxLatentEncoder(write_tiny_vae(tmp_path / "a.safetensors", seed=0), device="cpu")
    second = FluxLatentEncoder(write_tiny_vae(tmp_path / "b.safetensors", seed=1), device="cpu")
    assert first.identity != second.identity


def test_tokenizer_matches_transformers_qwen2tokenizer(tmp_path):
    from transformers import Qwen2Tokenizer

    folder = write_tiny_tokenizer(tmp_path / "tok")
    ours = ZImageTokenizer.load(folder)
    reference = Qwen2Tokenizer.from_pretrained(str(folder))
    for caption in CAPTIONS + ["it's we'll  the   photo\r\n\r\n x", "emoji 😀 e\u0301"]:
        text = CHAT_TEMPLATE.format(caption)
        assert ours._ids(text) == reference(text)["input_ids"], caption
    assert ours.pad_id == reference.convert_tokens_to_ids("<|endoftext|>")
    ours.backend.save(str(tmp_path / "tokenizer.json"))  # the other accepted form: one tokenizer.json
    from_json = ZImageTokenizer.load(tmp_path / "tokenizer.json")
    assert [from_json.token_ids(c) for c in CAPTIONS] == [ours.token_ids(c) for c in CAPTIONS]


def test_prompt_handling_follows_comfyui(tmp_path):
    tokenizer = ZImageTokenizer.load(write_tiny_tokenizer(tmp_path / "tok"))
    ids = tokenizer._ids
    assert tokenizer.token_ids("a cat") == ids(CHAT_TEMPLATE.format("a cat"))
    assert tokenizer.token_ids(r"a \(cat\)") == ids(CHAT_TEMPLATE.format("a (cat)"))
    # text is split at " embedding:" (the space dropped), each piece tokenized apart; Z-Image keeps the name as text
    expected = ids("<|im_start|>user\na") + ids("embedding:style red dog<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.token_ids("a embedding:style red dog") == expected
    # the mask ends at the first pad token: what follows never reaches the features
    cut = tokenizer.token_ids("the cat<|endoftext|>the dog")
    assert cut == ids("<|im_start|>user\nthe cat")


def test_text_encoder_matches_transformers_qwen3(tmp_path):
    from transformers import Qwen3Config, Qwen3Model

    files = tiny_encoder_files(tmp_path)
    encoder = Qwen3TextEncoder(files["text_encoder"], tokenizer=files["tokenizer"], device="cpu")
    vocab = encoder.model.shape.vocab_size
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=1024,
        attn_implementation="eager",
    )  # fmt: skip
    reference = Qwen3Model(config).eval()
    state = tiny_qwen3_state(vocab_size=vocab)
    reference.load_state_dict({k.removeprefix("model."): v.bfloat16().float() for k, v in state.items()})
    features = encoder.encode(CAPTIONS)
    assert [f.shape[1] for f in features] == [32] * len(CAPTIONS) and encoder.feature_dim == 32
    for caption, got in zip(CAPTIONS, features):
        ids = torch.tensor([encoder.tokenizer.token_ids(caption)])
        with torch.no_grad():
            expected = reference(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
        assert got.shape == expected.shape and relative(got, expected) < 1e-5, caption
    single = encoder.encode([CAPTIONS[0]])[0]
    assert relative(single, features[0]) < 1e-6  # padding in a batch does not change a caption's features


def test_text_encoder_finds_comfyui_tokenizer_from_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    files = tiny_encoder_files(tmp_path / "ComfyUI")
    assert find_tokenizer(None, files["text_encoder"]) == files["tokenizer"]
    elsewhere = tmp_path / "elsewhere" / "qwen.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(files["text_encoder"].read_bytes())
    with pytest.raises(TokenizerNotFound, match="--tokenizer"):
        find_tokenizer(None, elsewhere)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    assert find_tokenizer(None, elsewhere) == files["tokenizer"]


def test_refusals_name_the_file_and_the_fix(tmp_path):
    pickle_file = tmp_path / "qwen.ckpt"
    pickle_file.write_bytes(b"not read")
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(WeightsError, match="pickle"):
        Qwen3TextEncoder(pickle_file, tokenizer=tokenizer, device="cpu")
    quantized = write_tiny_qwen3(tmp_path / "fp8.safetensors", vocab_size=300)
    state = {"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(1), **tiny_qwen3_state(vocab_size=300)}
    save_file(state, str(quantized))
    with pytest.raises(WeightsError, match="quantized"):
        Qwen3TextEncoder(quantized, tokenizer=tokenizer, device="cpu")
    with pytest.raises(WeightsError, match="not a Qwen3 text encoder"):
        Qwen3TextEncoder(write_tiny_vae(tmp_path / "vae.safetensors"), tokenizer=tokenizer, device="cpu")
    sd_vae = {k: v for k, v in diffusers_to_flux(tiny_diffusers_vae().state_dict()).items()}
    sd_vae["encoder.conv_out.weight"] = sd_vae["encoder.conv_out.weight"][:8]  # 4-channel latents: an SD VAE
    save_file(sd_vae, str(tmp_path / "sd_vae.safetensors"))
    with pytest.raises(WeightsError, match="needs 16"):
        FluxLatentEncoder(tmp_path / "sd_vae.safetensors", device="cpu")
    with pytest.raises(TokenizerNotFound, match="no <|endoftext|>|tokenizer"):
        bad = tmp_path / "bad_tok"
        bad.mkdir()
        (bad / "tokenizer.json").write_text(json.dumps({"nope": 1}))
        ZImageTokenizer.load(bad)
    assert SPECIAL_TOKENS[0] == "<|endoftext|>"


def _stored(shard_dir):
    from training.data.shards import load_manifest, read_samples

    folder, manifest = load_manifest(shard_dir)
    return manifest, {s["__key__"]: s for s in read_samples([folder / s["name"] for s in manifest["shards"]])}


def test_pack_stores_what_the_encoders_compute_at_any_encode_batch(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from safetensors.torch import load as load_safetensors

    from tests.data_fixtures import make_dataset
    from training.data.pack import PackConfig, pack_dataset

    files = tiny_encoder_files(tmp_path / "ComfyUI")
    vae = FluxLatentEncoder(files["vae"], device="cpu")
    text = Qwen3TextEncoder(files["text_encoder"], tokenizer=files["tokenizer"], device="cpu")
    make_dataset(tmp_path / "photos", 7)
    packs = {}
    for batch in (1, 4):
        config = PackConfig(
            input_dir=tmp_path / "photos", output_dir=tmp_path / f"batch{batch}", resolution=64, samples_per_shard=3,
            store_image=True, image_format="png", storage_dtype="float32", encode_batch=batch,
        )  # fmt: skip
        pack_dataset(config, latent_encoder=vae, text_encoder=text)
        packs[batch] = _stored(config.output_dir)
    (manifest_1, samples_1), (manifest_4, samples_4) = packs[1], packs[4]
    assert manifest_1["fingerprint"] == manifest_4["fingerprint"] and len(samples_1) == 7
    assert manifest_1["contents"]["latent_encoder"] == vae.identity
    for key, sample in samples_1.items():
        tensors = load_safetensors(sample["safetensors"])
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"])))).permute(2, 0, 1).float() / 255
        assert relative(tensors["latent"], vae.encode(pixels[None])[0]) < 1e-6
        expected = text.encode([sample["txt"].decode()])[0]
        assert torch.equal(tensors["caption_features"], expected)
        batched = load_safetensors(samples_4[key]["safetensors"])
        assert relative(batched["latent"], tensors["latent"]) < 1e-5
        assert relative(batched["caption_features"], tensors["caption_features"]) < 1e-5


def test_device_choice(monkeypatch):
    from training.model.encoder_files import pick_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no GPU"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cuda' or 'cpu'"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun: this rank's GPU
    assert pick_device("auto") == torch.device("cuda", 3) and pick_device("cpu") == torch.device("cpu")
