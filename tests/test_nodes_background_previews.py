"""A background run's previews decoded with no Wait for Run (`nodes.preview_jobs`, `nodes.preview_vae`): Preview
Settings records the VAELoader's file and the decoder's digest, the decoding queue decodes a step when the jobs list
or the previews route asks, with the recorded file (checked against its digest) or the decoder this process holds,
and the PNGs equal the VAE decode of the latents. Hostile run folders are refused; the queue and the decoders held are
bounded. The bridge is faked; the decoder is the real one on a tiny Flux VAE."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_nodes_pack import FakeCLIP
from test_nodes_previews import FakeFluxVAE, settings
from test_nodes_support import install_fake_comfy, pack_module, snapshot_files

from tests.encoder_fixtures import diffusers_to_flux, tiny_diffusers_vae
from training.model.flux_vae import FLUX_SCALE, FLUX_SHIFT
from training.model.safetensors_io import write_safetensors

preview_jobs = pack_module("nodes.preview_jobs")
preview_queue = pack_module("nodes.preview_queue")
preview_vae = pack_module("nodes.preview_vae")
previews = pack_module("nodes.previews")
jobs_api = pack_module("nodes.jobs_api")
flux_vae = pack_module("training.model.flux_vae")
images = pack_module("training.engine.preview_images")
write_status = pack_module("training.run.events").write_status

PROMPTS = ["a red cat", "a blue dog"]
LOADER_PROMPT = {
    "4": {"class_type": "WhetstonePreviewSettings", "inputs": {"vae": ["2", 0], "clip": ["1", 0]}},
    "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
}


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    monkeypatch.setattr(preview_jobs, "_decoding", preview_jobs.PreviewDecoding(threaded=False))
    return fake


def write_vae(comfy, seed: int = 0) -> dict[str, torch.Tensor]:
    """ae.safetensors in the vae folder: the tiny Flux VAE of FakeFluxVAE (seed 0) or other weights."""
    state = diffusers_to_flux(tiny_diffusers_vae(seed).state_dict(), decoder=True)
    save_file(state, str(comfy.folders["vae"] / "ae.safetensors"))
    return state


def request(prompt=LOADER_PROMPT):
    (made,) = previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), prompt=prompt, unique_id="4", **settings())
    return made


def sampled_run(comfy, name: str = "bg", steps=(0, 2), side: int = 6, source=None) -> tuple:
    """A run folder as a background run with Preview Settings leaves it: the VAE record, a status, and per preview
    step the engine's latents file and previews.jsonl line. Returns (run folder, {step: latents [2, 16, h, w]})."""
    run_dir = comfy.folders["whetstone_runs"] / name
    (run_dir / "previews").mkdir(parents=True)
    write_status(run_dir, "running", "step 2 of 4")
    preview_vae.write_source(run_dir, source or request().vae)
    latents = {}
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        latents[step] = torch.randn(len(PROMPTS), 16, side, side, generator=generator)
        entries = [(f"prompt.{i:03d}", latent) for i, latent in enumerate(latents[step])]
        write_safetensors(run_dir / "previews" / f"step_{step:07d}.safetensors", entries, {})
        event = {"step": step, "file": f"step_{step:07d}.safetensors", "prompts": PROMPTS, "width": 8 * side}
        with open(run_dir / "previews.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
    return run_dir, latents


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def drain() -> int:
    done = 0
    while preview_jobs.decoding().decode_next():
        done += 1
    return done


def test_preview_settings_record_the_vaeloader_file_its_dtype_and_the_decoders_digest(comfy, tmp_path):
    made = request()
    held = FakeFluxVAE().first_stage_model.state_dict()
    assert made.vae.vae_name == "ae.safetensors" and made.vae.dtype == "float32"
    assert made.vae.digest == preview_vae.decoder_digest(preview_vae.decoder_state(held))
    other = dict(held, **{"decoder.conv_in.bias": held["decoder.conv_in.bias"] + 1e-6})
    assert preview_vae.decoder_digest(preview_vae.decoder_state(other)) != made.vae.digest, "any weight counts"
    for prompt in (None, {}, {"4": {"inputs": {"vae": ["2", 0]}}, "2": {"class_type": "CheckpointLoaderSimple"}}):
        assert request(prompt).vae.vae_name is None  # not a VAELoader: decoded while this process holds it
    held_bf16 = {name: t.to(torch.bfloat16) for name, t in held.items()}
    assert preview_vae.held_dtype(held_bf16) == "bfloat16" and preview_vae.held_dtype(held) == "float32"
    preview_vae.write_source(tmp_path, made.vae)
    assert preview_vae.parse_source((tmp_path / "preview_vae.json").read_bytes(), "run") == made.vae  # round trip


def test_a_background_runs_preview_decodes_from_the_recorded_file_to_the_vae_decode_of_its_latents(comfy):
    state = write_vae(comfy)
    run_dir, latents = sampled_run(comfy)
    card = jobs_api.describe_job(run_dir, None)["previews"]
    assert (card["step"], card["state"], card["images"], card["prompts"]) == (2, "queued", [], PROMPTS)
    assert drain() == 1, "the jobs list asks for the latest step only"
    card = jobs_api.describe_job(run_dir, None)["previews"]
    assert card["state"] == "decoded" and len(card["images"]) == 2

    reference = tiny_diffusers_vae(0)  # an independent decoder with the same weights
    decoder = flux_vae.FluxVAE(flux_vae.FluxEncoderShape.from_file({k: v.shape for k, v in state.items()}, "ae"), state)
    for index, url in enumerate(card["images"]):
        query = dict(part.split("=") for part in url.split("?")[1].split("&"))
        status, body = preview_jobs.respond("preview_image", query, None)
        assert status == 200 and body == (run_dir / "previews" / f"step_0000002_p{index:03d}.png").read_bytes()
        got = png(run_dir / "previews" / f"step_0000002_p{index:03d}.png")
        latent = latents[2][index : index + 1]
        ours = np.asarray(images.to_image(decoder.decode(latent)[0]))
        assert got.shape == (48, 48, 3) and np.array_equal(got, ours), "the VAE decode of the latent, exactly"
        with torch.no_grad():
            pixels = ((reference.decode(latent / FLUX_SCALE + FLUX_SHIFT).sample + 1) / 2).clamp(0, 1)
        expected = np.clip(255.0 * pixels[0].movedim(0, -1).numpy(), 0, 255).astype(np.uint8)
        difference = np.abs(got.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.05, (difference.max(), difference.mean())
        assert got.std() > 5, "an image, not a constant"

    status, body = preview_jobs.respond("previews", {"run": "bg"}, None)
    assert status == 200 and [(s["step"], s["state"]) for s in body["steps"]] == [(0, "queued"), (2, "decoded")]
    assert drain() == 1 and preview_jobs.steps(run_dir)["steps"][0]["state"] == "decoded"
    assert not preview_jobs.decoding().decode_next(), "each step is decoded once"


def test_the_decoder_this_process_holds_decodes_a_vae_that_no_file_names(comfy):
    made = request(prompt=None)  # a VAE from elsewhere (a checkpoint's): no name recorded
    run_dir, latents = sampled_run(comfy, steps=(0,), source=made.vae)
    assert preview_jobs.card(run_dir)["state"] == "queued" and drain() == 1
    failed = preview_jobs.card(run_dir)
    assert failed["state"] == "failed" and "did not come from a VAELoader" in failed["message"]
    assert preview_jobs.card(run_dir)["state"] == "failed" and drain() == 0, "a failure is not retried every poll"

    preview_jobs.remember(made.vae, made.decode)  # what background Train does with Preview Settings' decoder
    (run_dir / "previews" / "step_0000000.safetensors").touch()  # latents written again (a resumed run)
    assert preview_jobs.card(run_dir)["state"] == "queued" and drain() == 1
    assert preview_jobs.card(run_dir)["state"] == "decoded"
    expected = np.asarray(images.to_image(made.decode(latents[0][1:2])[0]))
    assert np.array_equal(png(run_dir / "previews" / "step_0000000_p001.png"), expected)


def test_a_failed_step_is_decoded_once_its_decoder_is_remembered_with_no_new_latents(comfy):
    """A step that failed for want of a decoder is decoded when Preview Settings' decoder is remembered later (a new
    prompt with the same VAE) without its latents being written again: it stayed failed until ComfyUI restarted."""
    made = request(prompt=None)
    run_dir, _ = sampled_run(comfy, steps=(0,), source=made.vae)
    preview_jobs.card(run_dir)
    drain()
    assert preview_jobs.card(run_dir)["state"] == "failed"
    preview_jobs.remember(made.vae, made.decode)
    assert preview_jobs.card(run_dir)["state"] == "queued" and drain() == 1
    assert preview_jobs.card(run_dir)["state"] == "decoded"


def test_a_failed_step_is_asked_again_after_a_while(comfy, monkeypatch):
    """A failure is not retried every poll, but not forever either: the VAE put back into ComfyUI's vae folder (or a
    disk no longer full) decodes the step once FAILURE_RETRY_S have passed (it stayed failed until a restart)."""
    now = [1000.0]
    monkeypatch.setattr(preview_queue, "_now", lambda: now[0])
    run_dir, _ = sampled_run(comfy, steps=(0,))
    preview_jobs.card(run_dir)
    drain()
    assert "not in ComfyUI's vae folder" in preview_jobs.card(run_dir)["message"]
    write_vae(comfy)  # put back
    now[0] += preview_jobs.FAILURE_RETRY_S - 1
    assert preview_jobs.card(run_dir)["state"] == "failed" and drain() == 0
    now[0] += 2
    assert preview_jobs.card(run_dir)["state"] == "queued" and drain() == 1
    assert preview_jobs.card(run_dir)["state"] == "decoded"


def test_a_vae_file_changed_since_the_run_started_is_refused_not_decoded(comfy):
    write_vae(comfy, seed=1)  # other weights under the recorded name
    run_dir, _ = sampled_run(comfy, steps=(0,))
    preview_jobs.card(run_dir)
    drain()
    card = preview_jobs.card(run_dir)
    assert card["state"] == "failed" and "changed since the run started" in card["message"]
    assert not list((run_dir / "previews").glob("*.png"))
    (comfy.folders["vae"] / "ae.safetensors").unlink()
    other, _ = sampled_run(comfy, name="gone", steps=(0,))
    preview_jobs.card(other)
    drain()
    assert "not in ComfyUI's vae folder" in preview_jobs.card(other)["message"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"format": 2, "vae_name": "ae.safetensors", "dtype": "float32", "digest": "0"}', "format-1"),
        (
            b'{"format": true, "vae_name": "ae.safetensors", "dtype": "float32", "digest": "' + b"0" * 64 + b'"}',
            "format-1",
        ),
        (
            b'{"format": 1.0, "vae_name": "ae.safetensors", "dtype": "float32", "digest": "' + b"0" * 64 + b'"}',
            "format-1",
        ),
        (b'{"format": 1, "vae_name": "ae.safetensors", "dtype": "float32"}', "exactly format"),
        (b'{"format": 1, "vae_name": "ae.safetensors", "dtype": "int8", "digest": "' + b"0" * 64 + b'"}', "dtype"),
        (b'{"format": 1, "vae_name": "ae.safetensors", "dtype": "float32", "digest": "../x"}', "digest"),
        (b'{"format": 1, "vae_name": 7, "dtype": "float32", "digest": "' + b"0" * 64 + b'"}', "vae_name"),
        (
            b'{"format": 1, "vae_name": "../../secret.safetensors", "dtype": "float32", "digest": "'
            + b"0" * 64
            + b'"}',
            "not in ComfyUI's vae folder",
        ),
    ],
)
def test_a_hostile_vae_record_is_refused_with_its_reason(comfy, record, message):
    write_vae(comfy)
    run_dir, _ = sampled_run(comfy, steps=(0,))
    (run_dir / "preview_vae.json").write_bytes(record)
    preview_jobs.card(run_dir)
    drain()
    card = preview_jobs.card(run_dir)
    assert card["state"] == "failed" and message in card["message"], card["message"]


def test_hostile_run_folders_write_nothing_outside_and_read_nothing_unbounded(comfy, tmp_path):
    write_vae(comfy)
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir, _ = sampled_run(comfy, steps=(0,))
    (run_dir / "previews").rename(outside / "previews")
    os.symlink(outside / "previews", run_dir / "previews")  # the previews folder is a link leaving the run
    before = snapshot_files(outside)
    preview_jobs.card(run_dir)
    drain()
    assert "links are not followed" in preview_jobs.card(run_dir)["message"] and snapshot_files(outside) == before

    huge, _ = sampled_run(comfy, name="huge", steps=(0,), side=preview_jobs.MAX_SIDE + 1)
    preview_jobs.card(huge)
    drain()
    assert "h, w <= 256" in preview_jobs.card(huge)["message"], "refused from the header, before any read"
    link, _ = sampled_run(comfy, name="link", steps=(0,))
    (link / "preview_vae.json").unlink()
    os.symlink(outside / "x.json", link / "preview_vae.json")
    preview_jobs.card(link)
    drain()
    assert "no readable preview_vae.json" in preview_jobs.card(link)["message"]

    for query, status in [
        ({"run": "../bg", "step": "0", "prompt": "0"}, 400),
        ({"run": "huge", "step": "-1", "prompt": "0"}, 400),
        ({"run": "huge", "step": "0", "prompt": "64"}, 400),
        ({"run": "huge", "step": "0x1", "prompt": "0"}, 400),
        ({"run": "huge", "step": "0", "prompt": "0"}, 404),  # not decoded
        ({"run": "nope", "step": "0", "prompt": "0"}, 404),
        ({"run": "bg", "step": "0", "prompt": "0"}, 404),  # its previews folder is a link
    ]:
        assert preview_jobs.respond("preview_image", query, None)[0] == status, query
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    os.symlink(outside / "secret.png", huge / "previews" / "step_0000000_p000.png")
    assert preview_jobs.respond("preview_image", {"run": "huge", "step": "0", "prompt": "0"}, None)[0] == 404
    (run_dir / "previews.jsonl").unlink()
    (run_dir / "previews.jsonl").write_text('{"step": 1, "file": "../../x.safetensors", "prompts": ["a"]}\n' * 3)
    assert preview_jobs.card(run_dir) is None, "an event naming another file is no preview"
    with open(huge / "previews.jsonl", "r+", encoding="utf-8") as handle:  # megabytes of junk before the event
        line = handle.read()
        handle.seek(0)
        handle.write("x" * (4 << 20) + "\n" + line)
    assert preview_jobs.card(huge)["step"] == 0, "the list reads the tail of the events only"


def test_a_preview_event_python_refuses_to_convert_is_skipped_not_raised(comfy):
    """A previews.jsonl line with a 5000-digit integer or nesting too deep is no preview event: the card, the previews
    route and the jobs list still answer (json.loads raised ValueError / RecursionError out of all three)."""
    write_vae(comfy)
    run_dir, _ = sampled_run(comfy, steps=(0,))
    with open(run_dir / "previews.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": ' + "9" * 5000 + ', "file": "step_0000001.safetensors", "prompts": ["a"]}\n')
        handle.write("[" * 5000 + "\n")  # fits the card's 16 KiB tail with the good line
    assert preview_jobs.card(run_dir)["step"] == 0
    status, body = preview_jobs.respond("previews", {"run": "bg"}, None)
    assert status == 200 and [entry["step"] for entry in body["steps"]] == [0]
    status, body = jobs_api.respond("list", {}, None)
    assert status == 200 and [job["previews"]["step"] for job in body["jobs"]] == [0]


def test_wait_for_runs_watcher_never_writes_or_reads_through_a_link(comfy, tmp_path, monkeypatch, caplog):
    """Wait for Run (and Train) decode a step in their own thread (`decode_here`): a previews folder that is a link
    out of the run is refused as the worker refuses it (the watcher wrote its PNGs through it), and a PNG that is a
    link is not read into ComfyUI's temp folder (it was read whole, through the link)."""
    monkeypatch.setattr(pack_module("nodes.comfy_bridge"), "temp_directory", lambda: tmp_path / "temp")
    made = request()
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir, _ = sampled_run(comfy, steps=(0,), source=made.vae)
    (run_dir / "previews").rename(outside / "previews")
    os.symlink(outside / "previews", run_dir / "previews")
    before = snapshot_files(outside)
    watcher = previews.PreviewWatcher(run_dir, "bg", "7", made.decode)
    watcher.poll()  # refused, logged, and the node goes on
    assert "links are not followed" in caplog.text
    assert snapshot_files(outside) == before and not comfy.events

    other, _ = sampled_run(comfy, name="other", steps=(0,), source=made.vae)
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    watcher = previews.PreviewWatcher(other, "other", "7", made.decode)
    watcher.poll()  # decoded and sent
    png_path = other / "previews" / "step_0000000_p000.png"
    png_path.unlink()
    os.symlink(outside / "secret.png", png_path)
    with pytest.raises(ValueError, match="not a plain PNG"):
        watcher.send({"step": 0, "prompts": PROMPTS}, images.event_images(other, {"step": 0, "prompts": PROMPTS}))
    assert b"secret" not in b"".join(p.read_bytes() for p in (tmp_path / "temp").rglob("*.png"))


def test_an_image_removed_while_the_list_is_made_does_not_break_the_list(comfy, monkeypatch):
    """A decoded step whose PNGs are removed between the decoded check and the URLs (the run folder cleaned up while
    the jobs list is made) is asked again; the list and the previews route answered 500 (FileNotFoundError)."""
    write_vae(comfy)
    run_dir, _ = sampled_run(comfy, steps=(0,))
    preview_jobs.card(run_dir)
    drain()
    decoding = preview_jobs.decoding()
    real_status = decoding.status
    removed = []

    def status_then_removed(run_dir, event):
        answer = real_status(run_dir, event)
        if not removed:
            removed.extend(images.event_images(run_dir, event))
            for path in removed:
                path.unlink()
        return answer

    monkeypatch.setattr(decoding, "status", status_then_removed)
    status, body = jobs_api.respond("list", {}, None)
    assert status == 200 and body["jobs"][0]["previews"]["state"] == "queued", body
    assert body["jobs"][0]["previews"]["images"] == [] and drain() == 1
    assert jobs_api.respond("list", {}, None)[1]["jobs"][0]["previews"]["state"] == "decoded"


def test_an_unexpected_error_is_a_one_line_500_logged_with_its_traceback(comfy, monkeypatch, caplog):
    """A bug behind a route is a 500 with one line of JSON (the traceback in the log, not in the answer); in the
    jobs list it leaves out only the run it happened on."""

    def broken(*args):
        raise RuntimeError("a bug")

    sampled_run(comfy, steps=(0,))
    plain = comfy.folders["whetstone_runs"] / "plain"
    plain.mkdir()
    write_status(plain, "completed", "done")
    real_card = preview_jobs.card
    monkeypatch.setattr(preview_jobs, "card", lambda run_dir: broken() if run_dir.name == "bg" else real_card(run_dir))
    status, body = jobs_api.respond("list", {}, None)
    assert status == 200 and [job["run"] for job in body["jobs"]] == ["plain"]
    assert "run bg left out of the jobs list" in caplog.text and "Traceback" in caplog.text
    monkeypatch.setattr(preview_jobs, "steps", broken)
    status, body = preview_jobs.respond("previews", {"run": "bg"}, None)
    assert status == 500 and body == {"error": "previews previews failed: RuntimeError: a bug (see ComfyUI's log)"}
    monkeypatch.setattr(jobs_api, "list_jobs", broken)
    assert jobs_api.respond("list", {}, None) == (
        500,
        {"error": "jobs list failed: RuntimeError: a bug (see ComfyUI's log)"},
    )


@pytest.mark.parametrize("step", ["\u0661", "0\n", "\uff10", " 0", "0 "])
def test_the_image_route_takes_ascii_digits_only(comfy, step):
    """`re.match(r"^\\d{1,9}$")` took Arabic-Indic and full-width digits and a trailing newline (int() reads them)."""
    run_dir, _ = sampled_run(comfy, steps=(0,))
    (run_dir / "previews" / "step_0000000_p000.png").write_bytes(preview_jobs.PNG_SIGNATURE + b"a PNG")
    assert preview_jobs.respond("preview_image", {"run": "bg", "step": "0", "prompt": "0"}, None)[0] == 200
    status, body = preview_jobs.respond("preview_image", {"run": "bg", "step": step, "prompt": "0"}, None)
    assert status == 400 and "whole number" in body["error"]
    status, body = preview_jobs.respond("preview_image", {"run": "bg", "step": "0", "prompt": step}, None)
    assert status == 400 and "whole number" in body["error"]


def test_a_run_without_previews_is_a_404_that_names_no_server_path(comfy):
    run_dir, _ = sampled_run(comfy, steps=(0,))
    (run_dir / "previews" / "step_0000000.safetensors").unlink()
    (run_dir / "previews").rmdir()
    status, body = preview_jobs.respond("preview_image", {"run": "bg", "step": "0", "prompt": "0"}, None)
    assert (status, body) == (404, {"error": "run 'bg' has no previews folder"})


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_the_tail_keeps_a_line_that_starts_where_the_window_starts(comfy, extra):
    """The jobs list reads the last CARD_EVENTS_BYTES of previews.jsonl (and EVENTS_TAIL_BYTES of events.jsonl) and
    drops the line the window cuts. A file of exactly that size was taken as cut: its first, whole line was dropped
    (a run's only preview step, or a run's only step, was not shown)."""
    run_dir, _ = sampled_run(comfy, steps=(0,))
    line = (run_dir / "previews.jsonl").read_text().rstrip("\n")
    size = preview_jobs.CARD_EVENTS_BYTES
    (run_dir / "previews.jsonl").write_text("x" * extra + "\n" * bool(extra) + line.ljust(size - 1) + "\n")
    assert (run_dir / "previews.jsonl").stat().st_size == size + extra + bool(extra)
    assert preview_jobs.card(run_dir)["step"] == 0
    step = json.dumps({"step": 7, "loss": 0.5})
    events = "x" * extra + "\n" * bool(extra) + step.ljust(jobs_api.EVENTS_TAIL_BYTES - 1) + "\n"
    (run_dir / "events.jsonl").write_text(events)
    assert [event["step"] for event in jobs_api.recent_events(run_dir)] == [7]
    (run_dir / "events.jsonl").write_text("y" + events[extra + bool(extra) :])  # the step's line is cut now
    assert jobs_api.recent_events(run_dir) == []


def test_a_nodes_poll_does_not_wait_for_the_workers_long_decoding(comfy, monkeypatch, tmp_path):
    """While the worker decodes a step (minutes for 64 prompts at 2048 px), Wait for Run's poll waits at most
    WAIT_FOR_OTHER_S and goes on (its loop checks ComfyUI's Cancel between polls; it waited for the whole decode);
    a later poll sends the step, once, decoded once; the final poll waits for it."""
    monkeypatch.setattr(preview_jobs, "_decoding", preview_jobs.PreviewDecoding())
    monkeypatch.setattr(preview_queue, "WAIT_FOR_OTHER_S", 0.3, raising=False)  # (the old code had none)
    monkeypatch.setattr(pack_module("nodes.comfy_bridge"), "temp_directory", lambda: tmp_path / "temp")
    made = request()
    calls, entered, release = [], threading.Event(), threading.Event()

    def held_decode(latents):
        calls.append("worker")
        entered.set()
        assert release.wait(30)
        return made.decode(latents)

    run_dir, _ = sampled_run(comfy, steps=(0,), source=made.vae)
    preview_jobs.remember(made.vae, held_decode)
    preview_jobs.card(run_dir)
    assert entered.wait(30)
    watcher = previews.PreviewWatcher(run_dir, "bg", "7", lambda latents: calls.append("node") or made.decode(latents))
    polling = threading.Thread(target=watcher.poll)
    polling.start()
    polling.join(5)
    sent = [data["step"] for event, data in comfy.events if event == previews.PREVIEW_EVENT]
    alive = polling.is_alive()
    release.set()
    polling.join(30)
    assert not alive and sent == [] and calls == ["worker"], "the poll went on without the step"
    final = threading.Thread(target=watcher.poll, kwargs={"final": True})
    final.start()
    final.join(30)
    assert calls == ["worker", "worker"], "decoded once, by the worker"
    assert [data["step"] for event, data in comfy.events if event == previews.PREVIEW_EVENT] == [0]
    assert preview_jobs.decoding().close()


def test_a_nodes_poll_decodes_a_bounded_number_of_steps(comfy, monkeypatch, tmp_path):
    """Wait for Run attached to a long run found every step undecoded and decoded them all in one poll (no Cancel
    checked meanwhile), after reading the whole previews.jsonl: now STEPS_PER_POLL steps a poll, oldest first, from
    the file's tail; the final poll does the rest."""
    monkeypatch.setattr(pack_module("nodes.comfy_bridge"), "temp_directory", lambda: tmp_path / "temp")
    made = request()
    run_dir, _ = sampled_run(comfy, steps=(0, 1, 2, 3, 4), source=made.vae)
    watcher = previews.PreviewWatcher(run_dir, "bg", "7", made.decode)

    def sent():
        return [data["step"] for event, data in comfy.events if event == previews.PREVIEW_EVENT]

    watcher.poll()
    assert sent() == [0, 1], "STEPS_PER_POLL (2) steps"
    watcher.poll()
    assert sent() == [0, 1, 2, 3]
    watcher.poll(final=True)
    assert sent() == [0, 1, 2, 3, 4]
    watcher.poll(final=True)
    assert sent() == [0, 1, 2, 3, 4], "each step is sent once"


def test_a_step_the_node_cannot_decode_is_logged_and_skipped_not_raised(comfy, monkeypatch, tmp_path, caplog):
    """Train's follow loop stops the training run on any exception from its preview watcher: one preview step that
    fails to decode (a torch error, a full disk, a latents file refused) stopped a run that trained fine. Now the
    step is logged and skipped (not retried every poll), and the others are shown."""
    monkeypatch.setattr(pack_module("nodes.comfy_bridge"), "temp_directory", lambda: tmp_path / "temp")
    made = request()
    run_dir, latents = sampled_run(comfy, steps=(0, 2), source=made.vae)
    calls = []

    def decode(batch):
        calls.append(1)
        if torch.equal(batch[0], latents[0][0]):
            raise RuntimeError("out of memory")
        return made.decode(batch)

    watcher = previews.PreviewWatcher(run_dir, "bg", "7", decode)
    watcher.poll()
    assert [data["step"] for event, data in comfy.events if event == previews.PREVIEW_EVENT] == [2]
    assert "the previews of step 0 are not shown: out of memory" in caplog.text and "Traceback" in caplog.text
    tried = len(calls)
    watcher.poll(final=True)
    assert len(calls) == tried, "not tried again every poll"


def test_the_queue_and_the_decoders_held_are_bounded(comfy, monkeypatch):
    monkeypatch.setattr(preview_queue, "MAX_PENDING", 2)  # the queue reads its own module's bound
    write_vae(comfy)
    run_dir, _ = sampled_run(comfy, steps=(0, 1, 2))
    states = [entry["state"] for entry in preview_jobs.steps(run_dir)["steps"]]
    assert states == ["busy", "queued", "queued"], "the newest are queued first; the rest is asked again later"
    assert drain() == 2
    assert [entry["state"] for entry in preview_jobs.steps(run_dir)["steps"]] == ["queued", "decoded", "decoded"]
    decoding = preview_jobs.decoding()
    for seed in range(preview_jobs.MAX_DECODERS + 2):
        source = preview_vae.VaeSource(vae_name=None, dtype="float32", digest=f"{seed:064x}")
        decoding.remember(source, lambda latents: latents)
    assert len(decoding._decoders) == preview_jobs.MAX_DECODERS


def test_the_worker_thread_stops_on_close_after_the_image_it_decodes(comfy):
    """The worker (a daemon thread that waited forever) stops on `close`, which the process registers at exit: the
    image being decoded is finished and written whole, the step's other images are not started, nothing is queued
    after, and no thread is started again."""
    decoding = preview_jobs.PreviewDecoding()
    made = request()
    entered, release, calls = threading.Event(), threading.Event(), []

    def held_decode(latents):
        calls.append(1)
        entered.set()
        assert release.wait(30)
        return made.decode(latents)

    decoding.remember(made.vae, held_decode)
    run_dir, _ = sampled_run(comfy, steps=(0, 2), source=made.vae)
    events = preview_jobs.read_events(run_dir)
    assert decoding.status(run_dir, events[0]) == ("queued", "")
    assert decoding.status(run_dir, events[1]) == ("queued", "")
    assert entered.wait(30)
    thread = decoding._thread
    closing = threading.Thread(target=decoding.close)
    closing.start()
    time.sleep(0.3)
    release.set()
    closing.join(30)
    assert not closing.is_alive() and not thread.is_alive(), "the worker ended"
    assert calls == [1], "the step's second image and the second step were not started"
    first = run_dir / "previews" / "step_0000000_p000.png"
    assert first.is_file() and png(first).shape == (48, 48, 3), "the image it was decoding is whole"
    assert not [p for p in (run_dir / "previews").iterdir() if p.name.startswith(".")], "no temporary file left"
    state, message = decoding.status(run_dir, events[1])
    assert state == "busy" and "stopped" in message and decoding._thread is thread and decoding.close()


def test_training_report_decodes_the_previews_no_one_watched_and_says_which_it_could_not(comfy):
    report_node = pack_module("nodes.report_node")
    write_vae(comfy)
    run_dir, latents = sampled_run(comfy)
    chart, summary = report_node.TrainingReport().report(run_name="bg", smoothing=20)
    assert "not decoded" not in summary and chart.shape[1] > report_node.report_image([], 20).shape[1]
    decoded = png(run_dir / "previews" / "step_0000000_p000.png")
    assert preview_jobs.decoding().decode_next() is False, "decoded in the report's own thread"
    shape = flux_vae.FluxEncoderShape.from_file(
        {k: v.shape for k, v in FakeFluxVAE().first_stage_model.state_dict().items()}, "ae"
    )
    decoder = flux_vae.FluxVAE(shape, FakeFluxVAE().first_stage_model.state_dict())
    assert np.array_equal(decoded, np.asarray(images.to_image(decoder.decode(latents[0][:1])[0])))

    other, _ = sampled_run(comfy, name="other", steps=(0,))
    (other / "preview_vae.json").write_text("{}")
    chart, summary = report_node.TrainingReport().report(run_name="other", smoothing=20)
    assert "previews of step 0 not decoded" in summary and chart.shape[1] == report_node.report_image([], 20).shape[1]


def test_training_report_is_drawn_when_the_decoder_itself_fails(comfy, caplog):
    """A decoder that raises something other than ValueError/OSError (out of memory, a torch error) on one step is
    one line of the report's summary, logged with its traceback; the report raised it and drew nothing."""
    report_node = pack_module("nodes.report_node")
    made = request(prompt=None)

    def failing(latents):
        raise RuntimeError("not enough memory: you tried to allocate 4 GB")

    preview_jobs.remember(made.vae, failing)
    sampled_run(comfy, steps=(0, 2), source=made.vae)
    chart, summary = report_node.TrainingReport().report(run_name="bg", smoothing=20)
    assert "previews of step 0 not decoded: RuntimeError: not enough memory" in summary
    assert "previews of step 2 not decoded: RuntimeError" in summary and chart.ndim == 4
    assert "Traceback" in caplog.text


def test_the_worker_and_a_node_never_decode_one_step_twice(comfy, monkeypatch, tmp_path):
    monkeypatch.setattr(preview_jobs, "_decoding", preview_jobs.PreviewDecoding())  # its own worker thread
    monkeypatch.setattr(pack_module("nodes.comfy_bridge"), "temp_directory", lambda: tmp_path / "temp")
    made = request()
    calls, entered, release = [], threading.Event(), threading.Event()

    def held_decode(latents):  # the worker's decoder: holds the step until released
        calls.append("worker")
        entered.set()
        assert release.wait(30)
        return made.decode(latents)

    def node_decode(latents):
        calls.append("node")
        return made.decode(latents)

    run_dir, _ = sampled_run(comfy, steps=(0,), source=made.vae)
    preview_jobs.remember(made.vae, held_decode)
    assert preview_jobs.card(run_dir)["state"] in ("queued", "decoding")
    assert entered.wait(30), "the worker took the step"
    watcher = previews.PreviewWatcher(run_dir, "bg", "7", node_decode)  # Wait for Run polls meanwhile
    polling = threading.Thread(target=watcher.poll)
    polling.start()
    time.sleep(0.5)
    assert calls == ["worker"] and polling.is_alive(), "the node waits for the worker's decoding, not a second one"
    release.set()
    polling.join(30)
    assert calls == ["worker", "worker"] and not polling.is_alive()
    assert [data["step"] for event, data in comfy.events if event == previews.PREVIEW_EVENT] == [0]
    assert preview_jobs.card(run_dir)["state"] == "decoded"
    assert preview_jobs.decoding().close(), "its worker thread ends"
