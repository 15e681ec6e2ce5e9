"""Scale-out benchmarks: `pack` on 1 and N ranks (torchrun), checked byte-identical; one timed in-process pack (the
models loaded first: images/s by the wall clock, the device synchronized, and the seconds in the VAE and in the text
encoder); the shard loader reading the set from a local HTTP server versus the same folder on disk.

    .venv/bin/python bench/bench_scaleout.py --images 64 --ranks 1,2                 # tiny random encoders (CPU)
    python3 bench/bench_scaleout.py --images 256 --ranks 1 --device cuda --random-encoders full  # full-size, random
    .venv/bin/python bench/bench_scaleout.py --images 512 --ranks 1 --device cuda \\
        --vae models/vae/ae.safetensors --text-encoder models/text_encoders/qwen_3_4b.safetensors  # the real ones

``--random-encoders full`` writes a random-init Flux VAE encoder and Qwen3-4B (about 8 GB, drawn on the device) to
the temporary folder (bench/random_encoders.py) and packs at 1024 px from 1280-pixel JPEGs unless told otherwise;
``tiny`` (the default without --vae/--text-encoder) does the same at test widths. Prints one line per measurement and
writes bench_scaleout.json to $OUT (or the current folder). Exits non-zero when a distributed pack's bytes differ from
the one-rank pack's, a pack leaves out an image, the latents or features are not finite, or a command fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data.loader import ShardLoader  # noqa: E402

FULL_DEFAULTS = {"resolution": 1024, "size": 1280}  # --random-encoders full: Z-Image's training size
SMALL_DEFAULTS = {"resolution": 256, "size": 320}


def make_images(folder: Path, count: int, size: int, suffix: str = ".png", threads: int = 1) -> None:
    """Noise images (portrait and landscape, 4:3) with captions; encoded on ``threads`` threads (PIL lets go of the
    GIL while it compresses), each image from its own seed so the set does not depend on the thread count."""
    folder.mkdir(parents=True)

    def one(index: int) -> None:
        rng = np.random.default_rng(index)
        shape = (size, size * 3 // 4) if index % 2 else (size * 3 // 4, size)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"img{index:05d}{suffix}")
        (folder / f"img{index:05d}.txt").write_text(f"a test image number {index}, noise")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))


def pack(images: Path, out: Path, ranks: int, flags: list[str]) -> float:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default for its workers: the same numbers on CPU
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "training", "pack", str(images), str(out), *flags], cwd=REPO,
                          capture_output=True, text=True, env=env)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"pack on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def epoch_seconds(source, **options) -> tuple[float, int]:
    start = time.perf_counter()
    samples = sum(len(batch) for batch in ShardLoader(source, **options))
    return time.perf_counter() - start, samples


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def loader_over_http(shards: Path, cache: Path) -> dict:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(shards.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{shards.name}"
    options = {"batch_size": 4, "num_workers": 2, "seed": 0}
    try:
        local_s, samples = epoch_seconds(shards, **options)
        streamed_s, _ = epoch_seconds(url, **options)  # no cache: fetched, verified, removed
        cached_first_s, _ = epoch_seconds(url, cache_dir=cache, **options)
        cached_again_s, _ = epoch_seconds(url, cache_dir=cache, **options)
    finally:
        server.shutdown()
    return {"samples": samples, "local_s": local_s, "http_streamed_s": streamed_s,
            "http_cache_first_s": cached_first_s, "http_cache_warm_s": cached_again_s}  # fmt: skip


class TimedEncoder:
    """An encoder whose encode() calls are timed by the wall clock, the device synchronized before and after (the
    packer calls its encoders from one thread, so the seconds add up to the time spent in this encoder)."""

    def __init__(self, inner, device: torch.device) -> None:
        self.inner, self.device, self.seconds = inner, device, 0.0
        self.identity = inner.identity
        if hasattr(inner, "feature_dim"):
            self.feature_dim = inner.feature_dim

    def encode(self, batch):
        synchronize(self.device)
        start = time.perf_counter()
        result = self.inner.encode(batch)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pack(images: Path, out: Path, args: argparse.Namespace, count: int) -> dict:
    """One pack in this process with the models loaded and warmed up first: images/s of the pack alone (the wall
    clock, the device synchronized at the end) and the encoders' shares of it."""
    from training.data.pack import pack_dataset
    from training.data.pack_config import PackConfig
    from training.model.encoder_files import pick_device
    from training.model.flux_vae import FluxLatentEncoder
    from training.model.qwen3 import Qwen3TextEncoder

    device = pick_device(args.device)
    start = time.perf_counter()
    vae = TimedEncoder(FluxLatentEncoder(args.vae, device=args.device), device)
    text = TimedEncoder(Qwen3TextEncoder(args.text_encoder, tokenizer=args.tokenizer, device=args.device), device)
    vae.inner.encode(torch.rand(1, 3, args.resolution, args.resolution))  # warm-up (kernels chosen), not timed
    text.inner.encode(["a warm-up caption"])
    synchronize(device)
    load_s = time.perf_counter() - start
    config = PackConfig(input_dir=images, output_dir=out, resolution=args.resolution, num_threads=args.threads,
                        samples_per_shard=args.samples_per_shard, encode_batch=args.encode_batch)  # fmt: skip
    start = time.perf_counter()
    result = pack_dataset(config, latent_encoder=vae, text_encoder=text)
    synchronize(device)
    seconds = time.perf_counter() - start
    if result.samples != count:
        raise SystemExit(f"the timed pack stored {result.samples} of {count} images: see {result.report_path}")
    return {"load_s": load_s, "pack_s": seconds, "img_per_s": count / seconds, "vae_s": vae.seconds,
            "text_encoder_s": text.seconds, "vae_share": vae.seconds / seconds,
            "text_encoder_share": text.seconds / seconds}  # fmt: skip


def check_finite(shards: Path) -> int:
    """Every stored latent and caption feature is finite (random weights must not hide behind NaNs); the samples."""
    samples = 0
    for batch in ShardLoader(shards, batch_size=4, num_workers=0, seed=0):
        for name, tensor in (("latents", batch.latents), ("caption features", batch.caption_features)):
            if tensor is None or not torch.isfinite(tensor.float()).all():
                raise SystemExit(f"{shards}: {name} missing or not finite")
        samples += len(batch)
    return samples


def save(results: dict) -> None:
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "bench_scaleout.json").write_text(json.dumps(results, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="longer side of the generated images (default: "
        f"{FULL_DEFAULTS['size']} with --random-encoders full, else {SMALL_DEFAULTS['size']})",
    )
    parser.add_argument("--resolution", type=int, default=None, help=f"default: {FULL_DEFAULTS['resolution']} "
                        f"with --random-encoders full, else {SMALL_DEFAULTS['resolution']}")  # fmt: skip
    parser.add_argument("--samples-per-shard", type=int, default=8)
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; the first is the reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="image decode threads")
    parser.add_argument("--encode-batch", type=int, default=1)
    parser.add_argument(
        "--random-encoders",
        choices=("tiny", "full"),
        default=None,
        help="write random-init encoders of this size (default tiny without --vae/--text-encoder)",
    )
    parser.add_argument("--vae", type=Path, help="a real VAE file (with --text-encoder)")
    parser.add_argument("--text-encoder", type=Path, help="a real text encoder file (with --vae)")
    parser.add_argument("--tokenizer", type=Path, help="with real encoders: the Qwen tokenizer folder")
    args = parser.parse_args(argv)
    real = args.vae is not None or args.text_encoder is not None
    if real and (args.random_encoders is not None or args.vae is None or args.text_encoder is None):
        parser.error("give both --vae and --text-encoder (real encoders) or --random-encoders, not both")
    args.random_encoders = None if real else args.random_encoders or "tiny"
    defaults = FULL_DEFAULTS if args.random_encoders == "full" else SMALL_DEFAULTS
    args.resolution = args.resolution or defaults["resolution"]
    args.size = args.size or defaults["size"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        return run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the full-size random text encoder alone is 8 GB


def run(args: argparse.Namespace, root: Path) -> int:
    gpu = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None
    results: dict = {"images": args.images, "resolution": args.resolution, "device": args.device, "gpu": gpu,
                     "torch": torch.__version__, "encoders": args.random_encoders or "real", "pack": []}  # fmt: skip
    if args.random_encoders is not None:
        from random_encoders import write_random_encoders

        from training.model.encoder_files import pick_device

        start = time.perf_counter()
        files = write_random_encoders(root / "encoders", args.random_encoders, device=pick_device(args.device))
        args.vae, args.text_encoder, args.tokenizer = files["vae"], files["text_encoder"], files["tokenizer"]
        results["write_encoders_s"] = time.perf_counter() - start
        sizes = f"{args.vae.stat().st_size / 1e9:.2f} GB VAE, {args.text_encoder.stat().st_size / 1e9:.2f} GB text"
        print(f"random {args.random_encoders} encoders written in {results['write_encoders_s']:.1f} s: {sizes}")
    suffix = ".jpg" if args.random_encoders == "full" else ".png"
    make_images(root / "images", args.images, args.size, suffix, threads=args.threads)
    flags = ["--resolution", str(args.resolution), "--samples-per-shard", str(args.samples_per_shard), "--device",
             args.device, "--vae", str(args.vae), "--text-encoder", str(args.text_encoder), "--threads",
             str(args.threads), "--encode-batch", str(args.encode_batch)]  # fmt: skip
    flags += ["--tokenizer", str(args.tokenizer)] if args.tokenizer is not None else []
    reference = None
    for ranks in (int(r) for r in args.ranks.split(",")):
        out = root / f"pack-{ranks}"
        seconds = pack(root / "images", out, ranks, flags)
        contents = folder_bytes(out)
        identical = reference is None or contents == reference
        reference = reference or contents
        results["pack"].append({"ranks": ranks, "seconds": seconds, "img_per_s": args.images / seconds,
                                "identical_to_first": identical})  # fmt: skip
        print(f"pack {args.images} images on {ranks} rank(s): {seconds:.1f} s ({args.images / seconds:.1f} img/s, "
              f"process start and model load included); identical to the first: {identical}")  # fmt: skip
    first = root / f"pack-{args.ranks.split(',')[0]}"
    if check_finite(first) != args.images:
        raise SystemExit(f"{first} holds fewer samples than the {args.images} images")
    timed = results["timed_pack"] = timed_pack(root / "images", root / "pack-timed", args, args.images)
    print(f"timed pack on 1 rank ({args.device}, models loaded and warmed up in {timed['load_s']:.1f} s first): "
          f"{args.images} images in {timed['pack_s']:.2f} s = {timed['img_per_s']:.2f} img/s; "
          f"VAE {timed['vae_s']:.2f} s ({timed['vae_share']:.0%}), text encoder {timed['text_encoder_s']:.2f} s "
          f"({timed['text_encoder_share']:.0%}), the rest decoding, resizing and writing")  # fmt: skip
    save(results)  # the pack figures survive a failure of the loader's part
    results["loader"] = loader_over_http(first, root / "cache")
    print("loader epoch, " + ", ".join(f"{k} {v:.2f}" for k, v in results["loader"].items()))
    save(results)
    return 0 if all(entry["identical_to_first"] for entry in results["pack"]) else 1


if __name__ == "__main__":
    sys.exit(main())
