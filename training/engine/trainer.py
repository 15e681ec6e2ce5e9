"""The training loop: build everything from one TrainConfig, resume if a checkpoint exists, train, save, report."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.batches import Batch
from ..model.config import preset
from ..model.lora import LoraSettings
from ..run.events import RunLog, maybe_profile
from ..run.failure import StoppedWithAnotherRank, plan_for_messages, record
from ..run.session import run_session
from .background_writes import BackgroundWrites
from .build import (
    apply_mode,
    build_model,
    flow_objective,
    keep_lora_inputs_bf16,
    parallelized,
    precision_summary,
    uses_autocast,
)
from .checkpoint import Checkpointer
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from .divergence import check_finite
from .ema import WeightAverage
from .feed import build_loader, caption_limit, checked, limited_batches
from .gc_pauses import GcPauses
from .host_staging import HostStaging
from .objective import FlowObjective
from .optim import averaged_weights, build_optimizer, build_scheduler, clip_gradients, trainable_parameters
from .parallelize import attention_kernels, gradient_sync, unwrap
from .preview import Previewer, build_previewer
from .progress import Progress
from .results import prepare_result_staging, save_result
from .shapes import FixedShape, ResolutionStreams, shape_metrics, step_shapes
from .signals import GracefulStop
from .step_clock import StepClock, device_waiter
from .summary import peak_memory_gb, run_summary
from .synthetic import global_sample_indices
from .variant_setup import prepare_variant

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Trainer:
    config: TrainConfig
    dist_info: DistInfo
    model: nn.Module  # what the forward calls (DDP wrapper or the model)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: object  # SyntheticBatches or ShardLoader: state_dict() / load_state_dict()
    batches: Iterator[Batch]
    objective: FlowObjective
    empty_caption: torch.Tensor | None
    lora: LoraSettings | None
    checkpointer: Checkpointer
    log: RunLog
    clock: StepClock
    shapes: FixedShape | ResolutionStreams | None = None  # each step's resolution, micro-batch and stream
    progress: Progress | None = None  # the terminal's progress line (rank 0)
    variant: str = "base"  # the Z-Image variant the LoRA is for (training.model.variants)
    previewer: Previewer | None = None  # preview images at the configured steps (`preview`)
    ema: WeightAverage | None = None  # the EMA of the trained weights (config.ema), saved beside the result
    step: int = 0  # optimizer steps done
    saved_step: int | None = None  # the step of the newest LoRA / checkpoint this process wrote or resumed from
    history: deque = field(default_factory=lambda: deque(maxlen=1000))  # this process's latest step metrics
    result_writes: BackgroundWrites = field(default_factory=BackgroundWrites)  # the LoRA saves during the run
    result_staging: HostStaging = field(default_factory=lambda: HostStaging("LoRA staging"))  # their host buffers

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        dist_info: DistInfo,
        log: RunLog,
        progress: Progress | None = None,
        model: nn.Module | None = None,
    ) -> Trainer:
        """``model``: one already built from ``config.model`` (a benchmark reuses one random init), else built here."""
        captions = caption_limit(config)  # a dataset the plan does not hold stops here, before the model loads
        model = build_model(config, dist_info) if model is None else model
        variant = prepare_variant(model, config)  # Turbo: its de-distillation adapter merges before LoRA/QLoRA
        lora = apply_mode(model, config)
        keep_lora_inputs_bf16(model, config, dist_info, lora)
        run = config.run
        forward = parallelized(model, config, dist_info)
        params = trainable_parameters(model)
        logger.info("precision: %s", precision_summary(config, dist_info))
        optimizer = build_optimizer(params, config.optim, device=dist_info.device)
        loader, empty_caption = build_loader(config, dist_info, model)
        objective = flow_objective(config)
        shapes = step_shapes(loader, run, objective, lambda stream: limited_batches(stream, captions, config))
        trainer = cls(
            config=config,
            dist_info=dist_info,
            model=forward,
            params=params,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config.optim, total_steps=run.steps),
            loader=loader,
            batches=shapes.batches,
            objective=objective,
            empty_caption=empty_caption,
            lora=lora,
            variant=variant,
            checkpointer=Checkpointer(run.output_dir, rank=dist_info.rank, world_size=dist_info.world_size),
            log=log,
            clock=StepClock(device_waiter(dist_info.device)),
            shapes=shapes,
            progress=progress,
            ema=WeightAverage.create(model, config.ema, device=dist_info.device),
        )
        trainer.previewer = build_previewer(
            config,
            rank=dist_info.rank,
            device=dist_info.device,
            feature_dim=model.config.cap_feat_dim,
            empty_caption=empty_caption,
            forward_context=trainer._autocast,
            variant=variant,
        )
        trainer.resume()
        return trainer

    def resume(self) -> None:
        """Continue from the newest intact checkpoint (a damaged newer one is skipped, saying so), if any."""
        if not self.config.run.resume:
            return
        restored = self.checkpointer.restore(
            model=unwrap(self.model), optimizer=self.optimizer, scheduler=self.scheduler, ema=self._ema_state()
        )
        if restored is None:
            return
        self.loader.load_state_dict(restored.loader_state)
        self.step = self.saved_step = restored.step
        logger.info("resuming at step %d of %d", restored.step, self.config.run.steps)

    def train(self, stop: GracefulStop) -> str:
        """Run until the configured step count or a stop request; returns 'completed' or 'stopped'."""
        run = self.config.run
        save_every, reason = run.save_interval()
        when = f"every {save_every} steps and at the end" if save_every else "at the end only"
        logger.info("LoRA and checkpoint saves: %s (%s)", when, reason)
        if self.step >= run.steps:
            logger.info("the checkpoint is at step %d of %d: nothing left to train", self.step, run.steps)
            self._save_results(final=False)  # a kill may have left an older LoRA beside it (full models: final only)
        elif self.progress is not None:
            self.progress.phase("compiling (first step)" if run.compile else "first step")
        if self.step == 0:
            self._preview()
        with GcPauses() as gc_pauses:
            stopping = self._train_steps(stop, gc_pauses, save_every)
        if stopping:
            logger.warning("stopped at step %d on request (%s)", self.step, stop.signal_name or "another rank")
        self.result_writes.wait()
        self.checkpointer.wait()
        return "stopped" if self.step < run.steps else "completed"

    def _train_steps(self, stop: GracefulStop, gc_pauses: GcPauses, save_every: int) -> bool:
        """Steps until the configured count or an agreed stop request (returned), each logged, previewed and saved
        when due."""
        run = self.config.run
        stopping, first_step = False, self.step
        while self.step < run.steps and not stopping:
            with maybe_profile(self.step, run.profile_steps, run.output_dir, rank=self.dist_info.rank):
                metrics = self.train_step(stop_requested=stop.requested)
            stopping = metrics.pop("stop_requested")  # any rank's request, agreed through the step's one collective
            write_failed = metrics.pop("result_write_failed")
            check_finite(metrics, step=self.step + 1, saved_step=self.saved_step, writes=self.result_writes)
            self._check_result_writes(write_failed)
            self.step += 1
            metrics |= gc_pauses.take(self.step)
            if self.ema is not None:
                self.ema.update(self.step)
            self.history.append(metrics)
            self.log.step({"step": self.step, **metrics})
            if self.progress is not None:
                self.progress.step(self.step, metrics)
            self._preview()
            final = stopping or self.step == run.steps
            if final or (save_every and self.step % save_every == 0):
                if self.progress is not None:
                    self.progress.phase("saving")
                self.save(final=final)
            if self.step == first_step + 1 and not final:  # after its event: like a save's, its time is the next step's
                self._after_first_step(gc_pauses)
        return stopping

    def _after_first_step(self, gc_pauses: GcPauses) -> None:
        """What waits for the first step: the compiled graphs exist (the collector may freeze them), and the LoRA
        files' host buffers are allocated before the first save needs them."""
        gc_pauses.freeze_setup()
        if self.lora is not None and self.dist_info.is_main:
            prepare_result_staging(unwrap(self.model), self.lora, self.result_staging, ema=self.ema is not None)

    def _preview(self) -> None:
        """Previews after ``self.step`` steps when due; the step clock restarts after them (their time is theirs)."""
        if self.previewer is None or not self.previewer.schedule.due(self.step):
            return
        if self.progress is not None:
            self.progress.phase("previews")
        self.previewer.sample(self.step, unwrap(self.model))
        self.clock.reset()

    def _check_result_writes(self, failed_on_some_rank: bool) -> None:
        """Every rank stops at the same step when rank 0's background write of the result failed (agreed in the
        step's all-reduce), the others saying why instead of dying in a collective when rank 0 is gone."""
        if not failed_on_some_rank:
            return
        self.result_writes.wait()  # raises on the rank whose write failed
        raise StoppedWithAnotherRank(
            f"rank {self.dist_info.rank}: stopping with the rank whose background write of the result file failed "
            "(its error is in its log and in the run folder's error.txt)"
        )

    def train_step(self, *, stop_requested: bool = False) -> dict:
        """One optimizer step. Its metrics, every rank's stop request and whether a background result write failed
        travel in one all-reduce per step; ``stop_requested`` / ``result_write_failed`` are the same on every rank."""
        run = self.config.run
        self.clock.start()
        torch.manual_seed(run.seed + 1_000_003 * self.step + self.dist_info.rank)  # LoRA dropout, per step
        shape = self.shapes.at(self.step)
        n_buckets = self.objective.n_buckets
        stats = torch.zeros(5 + 2 * n_buckets, dtype=torch.float64, device=self.dist_info.device)
        sizes = []
        for micro in range(shape.grad_accum):
            output, waited, size = self._micro_step(micro, shape)
            sizes.append(size)
            stats[0] += output.per_sample.double().sum()
            stats[1] += output.per_sample.numel()
            stats[2] += waited
            stats[3 : 3 + 2 * n_buckets] += self.objective.bucket_stats(output.sigma, output.per_sample).flatten()
        if self.result_writes.failed():  # the flags are zero unless set: no launch on a normal step
            stats[-2] = 1.0
        if stop_requested:
            stats[-1] = 1.0
        grad_norm = clip_gradients(self.params, self.config.optim.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce_sum(stats)
        elapsed = self.clock.lap()  # after the device has finished the step (and the all-reduce)
        values = stats.tolist()
        loss_sum, samples, waited = values[:3]
        return shape_metrics(shape, sizes, loss_sum / samples) | {
            "loss": loss_sum / samples,
            "loss_sigma": self.objective.bucket_means(stats[3 : 3 + 2 * n_buckets].view(2, -1)),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "img_per_s": samples / elapsed,
            "data_wait": waited / self.dist_info.world_size / elapsed,
            "step_s": elapsed,
            "peak_mem_gb": peak_memory_gb(self.dist_info.device),
            "result_write_failed": values[-2] > 0,
            "stop_requested": values[-1] > 0,
        }

    def _micro_step(self, micro: int, shape):
        """Forward and backward of one micro-batch of the step's ``shape``; returns the loss output, the seconds
        spent waiting for data and the batch's image size."""
        started = time.perf_counter()
        batch = checked(next(shape.batches)).to(self.dist_info.device, non_blocking=True)
        waited = time.perf_counter() - started
        indices = global_sample_indices(
            self.step,
            micro,
            rank=self.dist_info.rank,
            world_size=self.dist_info.world_size,
            micro_batch=shape.micro_batch,
            grad_accum=shape.grad_accum,
        )[: len(batch)]
        with gradient_sync(self.model, sync=micro == shape.grad_accum - 1):
            with self._autocast():
                output = shape.objective.loss(self.model, batch, indices, self.empty_caption)
            (output.loss / shape.grad_accum).backward()
        return output, waited, tuple(batch.size)

    def _autocast(self) -> contextlib.ExitStack:
        """bf16 autocast on CUDA, and the SDPA kernel the plan priced (``model.attention_backend``)."""
        stack = contextlib.ExitStack()
        if uses_autocast(self.config, self.dist_info):
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        stack.enter_context(attention_kernels(self.config.model.attention_backend, self.dist_info.device))
        return stack

    def save(self, *, final: bool = False) -> None:
        """The ComfyUI-ready LoRA (rank 0, atomic) and the full resumable state (every rank), both written in the
        background unless ``final``: the process exits right after a final save, so it gains nothing from async."""
        self._save_results(final=final)
        self.saved_step = self.step
        if not self.config.run.save_state:
            return
        self.checkpointer.save(
            self.step,
            model=unwrap(self.model),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader_state=self.loader.state_dict(),
            extra={"step": self.step},
            async_save=not final,
            ema=self._ema_state(),
        )

    def _save_results(self, *, final: bool) -> None:
        """The result file and its EMA twin (`results.save_result`), after the previous save's writes have finished
        (their failure is raised here; one save's staged copy is held at a time)."""
        self.result_writes.wait()
        model = unwrap(self.model)
        save = functools.partial(
            save_result, model, self.config, lora=self.lora, variant=self.variant, step=self.step,
            dist_info=self.dist_info, final=final, writes=self.result_writes, staging=self.result_staging,
        )  # fmt: skip
        with averaged_weights(self.optimizer, self.params):  # schedule-free: its eval-mode average is the result
            save(ema=False)
        if self.ema is not None:
            with self.ema.swapped_in():
                save(ema=True)

    def _ema_state(self) -> dict | None:
        return None if self.ema is None else self.ema.state()


@record
def run_training(config: TrainConfig) -> int:
    """Train as this process's rank (torchrun) or as the only process; returns the exit code (0: completed/stopped).

    The run's lifecycle (`training.run.session`): rank 0 holds the run folder (refusing one that another run holds,
    `FolderBusy`), and a failure writes the rank's traceback and status 'failed' to the run folder, then raises."""
    dist_info = init_distributed(timeout_s=config.run.nccl_timeout_s)
    try:
        n_layers = preset(config.model.preset).n_layers
        plan = plan_for_messages(config, n_layers=n_layers, world_size=dist_info.world_size)
        with run_session(
            config.run.output_dir,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            plan=plan,
            agree=functools.partial(_every_rank, dist_info.device),
        ):
            return _train(config, dist_info)
    finally:
        shutdown_distributed()


def _train(config: TrainConfig, dist_info: DistInfo) -> int:
    log = RunLog(config.run.output_dir, rank=dist_info.rank, world_size=dist_info.world_size)
    progress = Progress(config.run.steps, rank=dist_info.rank)
    started = time.time()
    trainer: Trainer | None = None
    try:
        with GracefulStop() as stop:
            log.status("starting", f"{config.mode} on {dist_info.world_size} process(es)")
            progress.phase("loading weights" if config.model.weights else "building the model")
            trainer = Trainer.build(config, dist_info, log, progress)
            log.status("running", f"step {trainer.step} of {config.run.steps}")
            state = trainer.train(stop)
        message = f"{state} at step {trainer.step} of {config.run.steps}"
        log.summary(run_summary(config, dist_info, trainer, state, time.time() - started))
        log.status(state, message)
        logger.info("training %s", message)
        return 0
    finally:
        progress.close()
        if trainer is not None:  # a background save must end before its process group goes (errors: train's wait)
            trainer.result_writes.close(raise_error=False)
            trainer.checkpointer.close(raise_error=False)
        log.close()


def _every_rank(device: torch.device, ok: bool) -> bool:
    """True when ``ok`` is True on every rank (a collective)."""
    return all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=device)).item() == 0
