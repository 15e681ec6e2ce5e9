"""Distributed pre-encoding: `torchrun -m training pack` on 2 CPU ranks (gloo) is byte-identical to one process,
and an interrupted distributed pack resumes (on any number of ranks) to the same bytes.

The protocol tests run ranks as threads of this process with a barrier-backed group (the same `gather` contract as
torch.distributed's all_gather_object); the CLI test runs the real torchrun with the tiny Z-Image encoder files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.data_fixtures import make_dataset, noise_image, png_header_only, save_image
from tests.encoder_fixtures import tiny_encoder_files
from training.data.distributed_pack import pack_distributed
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, PackError, PackInterrupted, pack_dataset
from training.data.pack_parts import PARTS_DIR

REPO = Path(__file__).resolve().parents[1]


class ThreadGroup:
    """Ranks as threads: gather() is a collective over a shared slot list and a barrier."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, shared["world_size"], shared

    def gather(self, value) -> list:
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        values = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return values


def run_ranks(world_size: int, config: PackConfig | list[PackConfig], should_stop=None) -> list:
    """pack_distributed on `world_size` thread ranks (one config, or one per rank); each rank's result or error."""
    configs = config if isinstance(config, list) else [config] * world_size
    shared = {
        "world_size": world_size,
        "slots": [None] * world_size,
        "barrier": threading.Barrier(world_size, timeout=60),
    }
    outcomes: list = [None] * world_size

    def rank_main(rank: int) -> None:
        try:
            outcomes[rank] = pack_distributed(
                configs[rank],
                group=ThreadGroup(rank, shared),
                latent_encoder=TestLatentEncoder(),
                text_encoder=TestTextEncoder(),
                should_stop=None if should_stop is None else (lambda: should_stop(rank)),
            )
        except Exception as error:  # handed back to the test, which asserts on it
            outcomes[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def make_inputs(folder: Path) -> Path:
    """20 images in 3 buckets with captions, plus inputs skipped (a broken file, a bomb, too small) and noted
    (no caption) in the middle, so that shard boundaries do not fall on input blocks."""
    make_dataset(folder, 20)
    (folder / "img004b.png").write_bytes(b"not an image")
    (folder / "img009b.png").write_bytes(png_header_only(30000, 30000))
    save_image(folder / "img013b.png", noise_image(16, 16))
    save_image(folder / "img016b.png", noise_image(80, 80, seed=99))  # no caption: packed with "" and noted
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def single_process(root: Path, inputs: Path, **settings) -> dict[str, bytes]:
    config = PackConfig(input_dir=inputs, output_dir=root / "single", resolution=64, **settings)
    pack_dataset(config, latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder())
    return folder_bytes(root / "single")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_write_the_bytes_of_one_process(tmp_path, world_size):
    inputs = make_inputs(tmp_path / "in")
    expected = single_process(tmp_path, inputs, samples_per_shard=3)
    config = PackConfig(input_dir=inputs, output_dir=tmp_path / "dist", resolution=64, samples_per_shard=3)
    outcomes = run_ranks(world_size, config)
    assert outcomes[0].samples == 21 and outcomes[0].skipped == 3 and outcomes[1:] == [None] * (world_size - 1)
    got = folder_bytes(tmp_path / "dist")
    assert sorted(got) == sorted(expected) and len([n for n in got if n.endswith(".tar")]) == 7
    for name in expected:
        assert got[name] == expected[name], name
    assert not (tmp_path / "dist" / PARTS_DIR).exists() and not (tmp_path / "dist" / ".whetstone.lock").exists()
    again = run_ranks(world_size, config)  # a finished pack: nothing to do
    assert again[0].reused_shards == 7 and again[1:] == [None] * (world_size - 1)
    assert folder_bytes(tmp_path / "dist") == expected


def test_interrupted_pack_resumes_on_another_rank_count_to_the_same_bytes(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    expected = single_process(tmp_path, inputs, samples_per_shard=4)
    config = PackConfig(input_dir=inputs, output_dir=tmp_path / "dist", resolution=64, samples_per_shard=4)
    calls = {0: 0, 1: 0}

    def stop_rank_1_in_its_second_block(rank: int) -> bool:
        calls[rank] += 1
        return rank == 1 and calls[rank] > 6

    outcomes = run_ranks(2, config, should_stop=stop_rank_1_in_its_second_block)
    assert isinstance(outcomes[1], PackInterrupted) and "block 3" in str(outcomes[1])
    assert isinstance(outcomes[0], PackInterrupted) and "rank 1 stopped the pack while encoding" in str(outcomes[0])
    parts = sorted(p.name for p in (tmp_path / "dist" / PARTS_DIR).glob("part-*"))
    assert parts == [f"part-{b:06d}.{ext}" for b in (0, 1, 2, 4) for ext in ("json", "tar")]  # rank 0: 0, 2, 4
    assert not (tmp_path / "dist" / "manifest.json").exists()
    (tmp_path / "dist" / PARTS_DIR / "part-000002.tar").write_bytes(b"damaged")  # re-encoded, not trusted

    resumed = run_ranks(3, config)
    assert resumed[0].reused_shards == 3 and resumed[1:] == [None, None]  # parts 0, 1 and 4 kept
    assert folder_bytes(tmp_path / "dist") == expected


def test_a_changed_folder_is_refused_on_resume(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    config = PackConfig(input_dir=inputs, output_dir=tmp_path / "dist", resolution=64, samples_per_shard=4)
    outcomes = run_ranks(2, config, should_stop=lambda rank: rank == 0)
    assert all(isinstance(outcome, PackInterrupted) for outcome in outcomes)
    make_dataset(inputs, 21)  # one image more
    outcomes = run_ranks(2, config)
    assert isinstance(outcomes[0], PackError) and "interrupted distributed pack of other inputs" in str(outcomes[0])
    assert "img020" in str(outcomes[0])
    assert isinstance(outcomes[1], PackError) and "rank 0 stopped the pack" in str(outcomes[1])


def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, "-m", "training", "pack", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_torchrun_pack_with_the_zimage_encoders_matches_one_process(tmp_path):
    files = tiny_encoder_files(tmp_path / "ComfyUI")
    inputs = make_inputs(tmp_path / "in")
    flags = ["--resolution", "64", "--samples-per-shard", "3", "--device", "cpu", "--vae", str(files["vae"]),
             "--text-encoder", str(files["text_encoder"])]  # fmt: skip
    single = _cli(str(inputs), str(tmp_path / "single"), *flags)
    assert single.returncode == 0, single.stderr[-3000:]
    distributed = _cli(str(inputs), str(tmp_path / "dist"), *flags, nproc=2)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert "[rank 1]" in distributed.stderr and "distributed pack: rank 1 of 2" in distributed.stderr
    assert distributed.stdout.count("packed 21 samples into 7 shards") == 1  # rank 0 reports
    expected, got = folder_bytes(tmp_path / "single"), folder_bytes(tmp_path / "dist")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    assert json.loads(expected["manifest.json"])["contents"]["latent_encoder"].startswith("flux-vae:")


def test_an_output_folder_that_is_not_shared_is_refused(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    configs = [
        PackConfig(input_dir=inputs, output_dir=tmp_path / folder, resolution=64, samples_per_shard=4)
        for folder in ("node0", "node1")  # as if each node had its own disk at the same path
    ]
    outcomes = run_ranks(2, configs)
    assert isinstance(outcomes[1], PackError) and "is not one shared folder" in str(outcomes[1])
    assert isinstance(outcomes[0], PackError) and "rank 1 stopped the pack while checking" in str(outcomes[0])
    assert not (tmp_path / "node0" / "manifest.json").exists() and not (tmp_path / "node0" / ".whetstone.lock").exists()


def test_a_multi_resolution_pack_is_refused_on_several_ranks(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    config = PackConfig(input_dir=inputs, output_dir=tmp_path / "dist", resolution=(64, 128), samples_per_shard=3)
    outcomes = run_ranks(2, config)
    assert all("a distributed pack packs one resolution" in str(outcome) for outcome in outcomes), outcomes
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").glob("*.tar"))
