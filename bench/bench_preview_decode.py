"""Background preview decoding cost: seconds and peak memory to decode one preview image on the CPU with the full-size
Z-Image (Flux) VAE decoder, as `nodes.preview_jobs` does in ComfyUI's process (one latent at a time, float32).

    python bench/bench_preview_decode.py                 # 512² and 1024², this process's torch threads
    python bench/bench_preview_decode.py --sizes 64 --repeats 1   # a quick check of this script

The decoder has the real VAE's shape (channels 128/256/512/512, two blocks per level, 16 latent channels) with random
weights: the cost does not depend on their values. Each size is decoded once to warm up, then ``--repeats`` times;
reported: the median seconds per image, the torch threads, and the process's peak resident memory. Prints one JSON
object and writes it to $OUT/bench_preview_decode.json when OUT is set; fails (exit 1) if a decode is not finite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.encoder_fixtures import diffusers_to_flux  # noqa: E402
from training.model.flux_vae import FluxEncoderShape, FluxVAE  # noqa: E402

CHANNELS = (128, 256, 512, 512)


def full_size_decoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=CHANNELS,
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    state = diffusers_to_flux(model.state_dict(), decoder=True)
    shape = FluxEncoderShape.from_file({name: tuple(t.shape) for name, t in state.items()}, "random Flux VAE")
    decoder = {name: t.float() for name, t in state.items() if name.startswith("decoder.")}
    return FluxVAE(shape, decoder).decode, sum(t.numel() for t in decoder.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="preview sides in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes per size (default: %(default)s)")
    args = parser.parse_args(argv)
    decode, parameters = full_size_decoder()
    result = {"decoder_parameters": parameters, "torch_threads": torch.get_num_threads(), "sizes": {}}
    for side in args.sizes:
        latent = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(side))
        decode(latent)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            pixels = decode(latent)
            seconds.append(time.perf_counter() - started)
            if pixels.shape != (1, 3, side, side) or not torch.isfinite(pixels).all():
                print(f"decode at {side}² gave {tuple(pixels.shape)} or non-finite pixels", file=sys.stderr)
                return 1
        result["sizes"][str(side)] = {"median_s": statistics.median(seconds), "all_s": seconds}
        print(f"{side}²: {statistics.median(seconds):.2f} s per image ({args.repeats} decodes)", file=sys.stderr)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_preview_decode.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
