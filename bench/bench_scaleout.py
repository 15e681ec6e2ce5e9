"""Scale-out benchmarks: `pack` on 1 and N ranks (torchrun), checked byte-identical, and the shard loader reading a
set from a local HTTP server versus the same folder on disk.

    .venv/bin/python bench/bench_scaleout.py --images 64 --ranks 1,2                 # tiny encoders (CPU)
    .venv/bin/python bench/bench_scaleout.py --images 512 --ranks 1 --device cuda \\
        --vae models/vae/ae.safetensors --text-encoder models/text_encoders/qwen_3_4b.safetensors  # the real ones

Prints one line per measurement and writes bench_scaleout.json to $OUT (or the current folder). Exits non-zero when
a distributed pack's bytes differ from the one-rank pack's or a command fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data.loader import ShardLoader  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        shape = (size, size * 3 // 4) if index % 2 else (size * 3 // 4, size)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"img{index:05d}.png")
        (folder / f"img{index:05d}.txt").write_text(f"a test image number {index}, noise")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=320, help="longer side of the generated images")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=8)
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; the first is the reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae", type=Path, help="default: the tiny test VAE")
    parser.add_argument("--text-encoder", type=Path, help="default: the tiny test text encoder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    if args.vae is None or args.text_encoder is None:
        from tests.encoder_fixtures import tiny_encoder_files

        files = tiny_encoder_files(root / "ComfyUI")
        args.vae, args.text_encoder = files["vae"], files["text_encoder"]
    make_images(root / "images", args.images, args.size)
    flags = ["--resolution", str(args.resolution), "--samples-per-shard", str(args.samples_per_shard), "--device",
             args.device, "--vae", str(args.vae), "--text-encoder", str(args.text_encoder)]  # fmt: skip
    results: dict = {"images": args.images, "resolution": args.resolution, "device": args.device, "pack": []}
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
    results["loader"] = loader_over_http(root / f"pack-{args.ranks.split(',')[0]}", root / "cache")
    print("loader epoch, " + ", ".join(f"{k} {v:.2f}" for k, v in results["loader"].items()))
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "bench_scaleout.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(entry["identical_to_first"] for entry in results["pack"]) else 1


if __name__ == "__main__":
    sys.exit(main())
