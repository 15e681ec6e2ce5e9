"""Shard sets at a URL: a real HTTP server and an S3-compatible one (moto), both on 127.0.0.1, started here."""

from __future__ import annotations

import functools
import gc
import http.server
import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from tests.data_fixtures import SpyLatentEncoder, SpyTextEncoder, make_dataset
from training.data.loader import ShardLoader
from training.data.pack import PackConfig, pack_dataset
from training.data.remote import RemoteShardSet, RetryPolicy, ShardIntegrityError, parse_manifest

FAST_RETRY = RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.05)


def _pack(root: Path, samples_per_shard: int) -> Path:
    make_dataset(root / "in", 26)
    config = PackConfig(
        input_dir=root / "in", output_dir=root / "set", resolution=64, samples_per_shard=samples_per_shard
    )
    return pack_dataset(
        config, latent_encoder=SpyLatentEncoder(), text_encoder=SpyTextEncoder(feature_dim=32)
    ).output_dir


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same 26 samples as 26 one-sample shards (whole-shard layout) and as 9 shards (sample layout)."""
    root = tmp_path_factory.mktemp("remote")
    return {"many": _pack(root / "many", 1), "few": _pack(root / "few", 3)}


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def do_GET(self) -> None:
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.requests.append(name)
        if server.drops.get(name, 0) > 0 or name in server.corrupt:
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if name in server.corrupt:
                middle = len(data) // 2
                self.wfile.write(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
                return
            server.drops[name] -= 1
            self.wfile.write(data[: len(data) // 2])  # then the connection drops mid-shard
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@pytest.fixture
def http_server(sets):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(next(iter(sets.values())).parent.parent))
    )
    server.requests, server.drops, server.corrupt = [], {}, set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _keys_and_latents(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(batch.keys, batch.latents.clone()) for batch in loader]


def _same_batches(remote, local) -> None:
    assert len(remote) == len(local) > 0
    for (remote_keys, remote_latents), (local_keys, local_latents) in zip(remote, local, strict=True):
        assert remote_keys == local_keys
        assert torch.equal(remote_latents, local_latents)


@pytest.mark.parametrize(("which", "num_workers"), [("many", 2), ("few", 2)])
def test_http_set_gives_the_local_batches(sets, http_server, tmp_path, which, num_workers):
    server, base = http_server
    options = {"batch_size": 3, "num_workers": num_workers, "seed": 3, "world_size": 1}
    remote = ShardLoader(f"{base}/{which}/set", cache_dir=tmp_path / "cache", retry=FAST_RETRY, **options)
    assert remote.layout == ("shards" if which == "many" else "samples")
    _same_batches(_keys_and_latents(remote), _keys_and_latents(ShardLoader(sets[which], **options)))
    shard_requests = [name for name in server.requests if name.endswith(".tar")]
    assert sorted(shard_requests) == sorted(remote.shards)  # each shard fetched once
    cached = ShardLoader(f"{base}/{which}/set", cache_dir=tmp_path / "cache", retry=FAST_RETRY, **options)
    _same_batches(_keys_and_latents(cached), _keys_and_latents(ShardLoader(sets[which], **options)))
    assert [name for name in server.requests if name.endswith(".tar")] == shard_requests  # a second epoch: cache


def test_dropped_connection_is_retried(sets, http_server, tmp_path):
    server, base = http_server
    shard = json.loads((sets["many"] / "manifest.json").read_text())["shards"][4]["name"]
    server.drops[shard] = 2
    loader = ShardLoader(f"{base}/many/set", batch_size=3, num_workers=0, retry=FAST_RETRY, cache_dir=tmp_path)
    _same_batches(_keys_and_latents(loader), _keys_and_latents(ShardLoader(sets["many"], batch_size=3, num_workers=0)))
    assert server.requests.count(shard) == 3 and server.drops[shard] == 0


def test_connection_dropping_every_time_fails_naming_the_shard(sets, http_server, tmp_path):
    server, base = http_server
    shard = json.loads((sets["many"] / "manifest.json").read_text())["shards"][0]["name"]
    server.drops[shard] = 100
    loader = ShardLoader(f"{base}/many/set", batch_size=3, num_workers=0, retry=FAST_RETRY, cache_dir=tmp_path)
    with pytest.raises(OSError, match=f"could not fetch shard {shard} .* after 4 attempts"):
        list(loader)
    assert server.requests.count(shard) == 4
    assert not (loader.shard_dir / shard).exists() and not list(loader.shard_dir.glob(f".{shard}*"))


def test_corrupted_shard_is_refused_naming_it(sets, http_server, tmp_path):
    server, base = http_server
    shard = json.loads((sets["many"] / "manifest.json").read_text())["shards"][7]["name"]
    server.corrupt.add(shard)
    loader = ShardLoader(f"{base}/many/set", batch_size=3, num_workers=0, retry=FAST_RETRY, cache_dir=tmp_path)
    with pytest.raises(ShardIntegrityError, match=f"shard {shard} from .* does not match its manifest"):
        list(loader)
    assert server.requests.count(shard) == 1  # a wrong digest is not retried
    assert not (loader.shard_dir / shard).exists()


@pytest.mark.parametrize(("which", "num_workers", "stop"), [("many", 2, 3), ("few", 2, 2)])
def test_remote_position_resumes_like_a_local_one(sets, http_server, which, num_workers, stop):
    _, base = http_server
    options = {"batch_size": 3, "num_workers": num_workers, "seed": 5}
    uninterrupted = [key for batch in ShardLoader(sets[which], **options) for key in batch.keys]
    loader = ShardLoader(f"{base}/{which}/set", retry=FAST_RETRY, **options)  # no cache: a temporary view
    before = []
    for taken, batch in enumerate(loader, start=1):
        before.extend(batch.keys)
        if taken == stop:
            break
    state = json.loads(json.dumps(loader.state_dict()))
    local = ShardLoader(sets[which], **options)
    for _ in zip(range(stop), local):
        pass
    assert state == json.loads(json.dumps(local.state_dict()))  # the same position as a local loader's
    restored = ShardLoader(f"{base}/{which}/set", retry=FAST_RETRY, **options)
    restored.load_state_dict(state)
    assert before + [key for batch in restored for key in batch.keys] == uninterrupted


def test_temporary_view_keeps_no_shard_and_is_removed(sets, http_server):
    _, base = http_server
    loader = ShardLoader(f"{base}/many/set", batch_size=3, num_workers=0, retry=FAST_RETRY)
    assert loader.remote.transient
    assert sum(len(batch) for batch in loader) == 26
    folder = loader.shard_dir
    assert not list(folder.glob("*.tar"))  # each shard removed once read
    assert (folder / "manifest.json").is_file() and (folder / "empty_caption.safetensors").is_file()
    del loader
    gc.collect()
    assert not folder.parent.exists()


def _valid_manifest(sets) -> dict:
    return json.loads((sets["many"] / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["shards"][0].update(name="../../escape.tar"), "not a plain shard file name"),
        (lambda m: m["shards"][0].update(name="sub/data.tar"), "not a plain shard file name"),
        (lambda m: m["shards"][0].update(sha256="abc"), "not 64 lowercase hex"),
        (lambda m: m["shards"][0].update(bytes=-1), "bytes=-1 must be a non-negative integer"),
        (lambda m: m["shards"][0].update(samples=True), "samples=True must be a non-negative integer"),
        (lambda m: m["shards"][1].update(name=m["shards"][0]["name"]), "is listed twice"),
        (lambda m: m["shards"][0].update(buckets={"64x64": 5}), "add up to 5, not 1"),
        (lambda m: m.update(pack_version=99), "pack_version=99"),
        (lambda m: m.update(shards=[]), "non-empty list"),
    ],
)
def test_untrusted_manifest_fields_are_checked(sets, change, message):
    manifest = _valid_manifest(sets)
    parse_manifest(json.dumps(manifest).encode(), "m")
    change(manifest)
    with pytest.raises(ValueError, match=message):
        parse_manifest(json.dumps(manifest).encode(), "https://host/set/manifest.json")


def test_manifest_that_is_not_json_is_refused_unread(tmp_path, http_server):
    import pickle

    server, base = http_server
    folder = Path(server.RequestHandlerClass.keywords["directory"]) / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(pickle.dumps({"pack_version": 1}))
    with pytest.raises(ValueError, match="is not a JSON manifest"):
        RemoteShardSet.open(f"{base}/bad/manifest.json", cache_dir=tmp_path, retry=FAST_RETRY)
    with pytest.raises(FileNotFoundError):
        RemoteShardSet.open(f"{base}/missing", cache_dir=tmp_path, retry=FAST_RETRY)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_s3_set_gives_the_local_batches(sets, tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("shards")
        fs.put(str(sets["many"]) + "/", "shards/many/", recursive=True)
        loader_options = {"batch_size": 3, "num_workers": 2, "seed": 1}
        remote = ShardLoader(
            "s3://shards/many", cache_dir=tmp_path, retry=FAST_RETRY, storage_options=options, **loader_options
        )
        _same_batches(_keys_and_latents(remote), _keys_and_latents(ShardLoader(sets["many"], **loader_options)))
    finally:
        server.stop()


def test_training_on_an_http_set_matches_the_local_folder_and_resumes(tmp_path_factory, tmp_path):
    from tests.test_engine_resume import shard_config, with_steps
    from tests.test_engine_runs import assert_same_curve, train_in_process
    from training.apps.demo import make_images, pack_images

    root = tmp_path_factory.mktemp("train-remote")
    shards = pack_images(make_images(root / "images", count=4, size=96), root / "www" / "set", resolution=64, seed=0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root / "www")))
    server.requests, server.drops, server.corrupt = [], {}, set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/set"
        reference = train_in_process(shard_config(tmp_path / "local", shards, steps=4))
        first = shard_config(tmp_path / "remote", url, steps=2, save_every=2)
        first["data"]["shard_cache"] = str(tmp_path / "cache")
        assert len(train_in_process(first)) == 2
        resumed = train_in_process(with_steps(first, 4))  # resumes from the step-2 checkpoint
        assert_same_curve(resumed, reference, rel=0)
        assert any(name.endswith(".tar") for name in server.requests)
        assert list((tmp_path / "cache").glob("*/*.tar"))  # the cache kept the verified shard
    finally:
        server.shutdown()
        server.server_close()


def test_a_protocol_without_its_package_is_a_clear_error_not_retried(tmp_path):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match="cannot read gs://bucket/set/manifest.json: .*gcsfs"):
        RemoteShardSet.open("gs://bucket/set", cache_dir=tmp_path, retry=RetryPolicy(attempts=3, first_delay_s=5))
