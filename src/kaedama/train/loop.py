"""The training loop: one readable loop for one CPU, one GPU, N GPUs and several nodes.

``fit`` runs one training run; ``train`` runs ``cfg.trials`` of them with
different seeds and summarises. Distributed runs are started by ``torchrun``
(or a Kubeflow TrainJob, which sets the same variables): ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` select DDP over
gloo (CPU) or NCCL (GPU); without them the same code runs as one process.

Every rank trains on its shard of each global batch; metrics are summed across
ranks; only rank 0 writes checkpoints, history and TensorBoard logs.

Before every step the ranks exchange three integers over a CPU (gloo) group: how many
readable images each holds and whether any received SIGTERM or SIGINT. The first makes
the update exactly that of one process on the whole global batch even when images
are skipped (a rank whose whole shard is unreadable contributes a zero-weight pass,
and a step where no rank has an image is skipped by all). The second lets every rank
stop at the same step: on a stop signal (Kubernetes sends SIGTERM before killing a pod)
the run finishes the current step, writes a resumable ``last.pt`` and raises
:class:`Preempted` (exit code 128 + signal number: 143 for SIGTERM).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import kaedama
from kaedama import storage
from kaedama.config import config_to_dict
from kaedama.train import augment, optim
from kaedama.train.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, save_checkpoint
from kaedama.train.config import TrainConfig
from kaedama.train.data import (
    Batch,
    Splits,
    build_loaders,
    derive_seed,
    load_splits,
    seed_everything,
)
from kaedama.train.history import Board, write_history
from kaedama.train.model import (
    create_from_config,
    init_from_checkpoint,
    input_size,
    resolve_data_config,
    unwrap,
    weights_source,
)
from kaedama.train.runtime import (
    Preempted,
    Runtime,
    StopSignal,
    TrainError,
    all_gather,
    all_sum,
    barrier,
    close_runtime,
    consensus,
    init_runtime,
    weights_fingerprint,
)

log = logging.getLogger(__name__)

# Indices of the per-epoch metric sums (one tensor, so one all-reduce per epoch).
LOSS, CORRECT, COUNT, SKIPPED = range(4)
# Salts that keep the derived seeds of different uses apart.
_INIT, _STEP, _MIX = 1, 2, 3


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``cfg.amp`` on ``device`` (None = full precision)."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise TrainError("amp=fp16 needs a GPU; on CPU use amp=bf16 or amp=off")
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _progress(total: int, desc: str, rt: Runtime) -> tqdm:
    # One bar per epoch on rank 0; silent in non-TTY logs (Kubernetes, CI).
    return tqdm(
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (rt.is_main and sys.stderr.isatty()),
    )


# --------------------------------------------------------------------------- one epoch


@dataclass
class StepContext:
    """What a training step needs besides the batch."""

    model: nn.Module  # what the step calls: DDP- and/or compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    mixer: augment.BatchMixer
    ema: optim.ModelEma | None
    cfg: TrainConfig
    rt: Runtime
    dtype: torch.dtype | None
    input_hw: tuple[int, int]
    skipped_seen: set[str] = field(default_factory=set)
    stop: StopSignal = field(default_factory=StopSignal)  # polled before every step
    deadline: float | None = None  # clock() value at which the time budget is spent
    clock: Callable[[], float] = time.monotonic


@dataclass
class EpochProgress:
    """What :func:`train_one_epoch` did: this rank's metric sums and where it stopped."""

    sums: torch.Tensor  # float64 [loss_sum, correct, count, skipped]
    steps_done: int  # steps of the epoch completed (== steps unless stopped)
    stopped: int  # the signal on which all ranks stopped before finishing the epoch (0 = none)
    out_of_time: bool = False  # the time budget ended the epoch early (on every rank)


def _to_device(batch: Batch, rt: Runtime, channels_last: bool):
    images = batch.images.to(rt.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch.targets.to(rt.device, non_blocking=True)


def _note_skipped(batch: Batch, ctx: StepContext) -> None:
    for s in batch.skipped:
        if s.uri not in ctx.skipped_seen:
            ctx.skipped_seen.add(s.uri)
            log.warning("skipping %s: %s", s.uri, s.reason)


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """``model.train()``, keeping the BatchNorm layers of a frozen backbone in eval mode.

    Frozen layers must also keep their running statistics; in train mode BatchNorm
    would re-estimate them from the fine-tuning batches.
    """
    model.train()
    if cfg.freeze_until:
        optim.eval_frozen_norms(unwrap(model))


@contextmanager
def _inert(model: nn.Module, cfg: TrainConfig):
    # A zero-weight pass must leave no trace: no BatchNorm statistics either.
    model.eval()
    try:
        yield
    finally:
        set_train_mode(model, cfg)


def _step(
    ctx: StepContext, batch: Batch, *, epoch: int, step: int, weight: float, acc: torch.Tensor
) -> None:
    """One optimiser step on ``batch``, its loss scaled by ``weight`` (0 = contribute nothing)."""
    cfg, rt = ctx.cfg, ctx.rt
    # Dropout, drop-path and mixing draw from seeds fixed by (seed, epoch, step, rank).
    seed_everything(derive_seed(cfg.seed, epoch, step, rt.rank, _STEP), rt.device)
    images, targets = _to_device(batch, rt, cfg.channels_last)
    soft = None
    if ctx.mixer.enabled:
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, step, rt.rank, _MIX))
        images, soft = ctx.mixer(images, targets, generator=gen)
    inert = _inert(ctx.model, cfg) if not weight else nullcontext()
    with _autocast(rt.device, ctx.dtype), inert:
        logits = ctx.model(images)
    if soft is not None:
        loss = augment.soft_target_cross_entropy(logits, soft)
    else:
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss * weight).backward()
    if cfg.clip_grad > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        optim.clip_gradients(ctx.model, cfg.clip_grad)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update(unwrap(ctx.model))
    if weight:
        n = targets.shape[0]
        acc[LOSS] += loss.detach().double() * n
        acc[CORRECT] += (logits.detach().argmax(-1) == targets).sum()
        acc[COUNT] += n


def train_one_epoch(
    ctx: StepContext,
    loader: DataLoader,
    *,
    epoch: int,
    steps: int,
    start_step: int = 0,
    sums: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> EpochProgress:
    """Train for one epoch (from ``start_step`` when resuming), or until a stop signal.

    Skipped (unreadable) images are handled so that the update equals that of one
    process on the global batch's readable images: each rank scales its mean loss by
    ``world * local_count / global_count``. A rank whose whole shard is unreadable
    still runs a zero-weight pass (DDP needs every rank's backward) on its last good
    batch, or a blank one; a step with no readable image on any rank is skipped by all,
    only advancing the LR schedule.

    Args:
        ctx: model, optimiser, scheduler, ... (see :class:`StepContext`).
        loader: the training loader, its sampler already set to ``epoch``.
        epoch: 0-based epoch (seeds the step randomness).
        steps: optimiser steps in the epoch.
        start_step: steps already done in this epoch (mid-epoch resume).
        sums: metric sums carried over from before a mid-epoch resume.
        on_step: called as ``on_step(step_done, sums)`` after every step (checkpoints).

    Returns:
        This rank's sums, the steps done and whether the epoch was cut short by a signal.
    """
    cfg, rt = ctx.cfg, ctx.rt
    set_train_mode(ctx.model, cfg)
    acc = torch.zeros(4, dtype=torch.float64, device=rt.device)
    if sums is not None:
        acc += sums.to(rt.device)
    step = start_step
    if step >= steps:  # resumed from a stop after the epoch's last step
        return EpochProgress(acc, step, 0)
    fallback: Batch | None = None
    bar = _progress(steps - start_step, f"epoch {epoch + 1}/{cfg.epochs}", rt)
    stopped, out_of_time = 0, False
    for batch in loader:
        if step >= steps:
            break
        local = 0 if batch.images is None else int(batch.targets.shape[0])
        over = ctx.deadline is not None and ctx.clock() >= ctx.deadline
        total, signum, out_of_time = consensus(local, ctx.stop.received(), rt, over)
        if signum:  # before the step: the checkpoint then holds exactly `step` steps
            stopped = signum
            break
        if out_of_time:
            break
        _note_skipped(batch, ctx)
        acc[SKIPPED] += len(batch.skipped)
        if total:
            if local:
                fallback = batch
            else:
                batch = fallback or Batch(
                    torch.zeros(2, 3, *ctx.input_hw), torch.zeros(2, dtype=torch.long), ()
                )
            weight = rt.world * local / total
            _step(ctx, batch, epoch=epoch, step=step, weight=weight, acc=acc)
        else:
            # Nothing to learn from on any rank; keep the LR schedule aligned with the step count.
            ctx.scheduler.step()
        step += 1
        bar.update()
        if not bar.disable and step % 10 == 0:
            bar.set_postfix(loss=f"{float(acc[LOSS] / acc[COUNT].clamp(min=1)):.4f}")
        if on_step is not None:
            on_step(step, acc)
    bar.close()
    return EpochProgress(acc, step, stopped, out_of_time and not stopped)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    rt: Runtime,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``loader``, summed over ranks.

    Pass the plain (or compiled) model, never the DDP wrapper: ranks evaluate shards
    of different lengths and DDP's forward would wait for the others.

    Returns:
        ``{"loss", "acc", "images", "skipped"}``; loss and acc are None without images.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)
    seen: set[str] = set()
    for batch in loader:
        sums[SKIPPED] += len(batch.skipped)
        for s in batch.skipped:
            if s.uri not in seen:
                seen.add(s.uri)
                log.warning("skipping %s: %s", s.uri, s.reason)
        if batch.images is None:
            continue
        images, targets = _to_device(batch, rt, channels_last)
        with _autocast(rt.device, dtype):
            logits = model(images)
        sums[LOSS] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        sums[CORRECT] += (logits.argmax(-1) == targets).sum()
        sums[COUNT] += targets.shape[0]
    sums = all_sum(sums, rt).cpu()
    n = float(sums[COUNT])
    return {
        "loss": float(sums[LOSS]) / n if n else None,
        "acc": float(sums[CORRECT]) / n if n else None,
        "images": int(n),
        "skipped": int(sums[SKIPPED]),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fit


def lineage(splits: Splits, cfg: TrainConfig) -> dict[str, Any]:
    """Where a model comes from: the training manifest (URI and sha256 of its bytes), the
    perceptual-hash recipe its header records, the pretrained weights it started from and
    the kaedama version that trained it."""
    return {
        "manifest_uri": splits.manifest_uri,
        "manifest_sha256": splits.manifest_sha256,
        "hash_recipe": (splits.header or {}).get("hash_recipe"),
        "pretrained": weights_source(cfg),
        "kaedama_version": kaedama.__version__,
    }


def _resume_state(
    out_uri: str, cfg: TrainConfig, splits: Splits, rt: Runtime
) -> dict[str, Any] | None:
    """``last.pt`` to continue from, or None; refuses a run that would not continue it exactly.

    The data order and LR schedule are functions of the global batch (``batch_size``
    per rank x ranks) and of the manifest's rows: a resume with another world size is
    accepted only when the per-rank batch keeps the global batch, and one on another
    manifest (even with the same classes) is refused.
    """
    uri = storage.join(out_uri, LAST)
    if not cfg.resume:
        return None
    if not storage.exists(uri):
        log.info("no checkpoint at %s: starting from scratch", uri)
        return None
    state = load_checkpoint(uri)
    if state.get("model_name") != cfg.model or tuple(state.get("classes", ())) != splits.classes:
        raise CheckpointError(
            f"{uri} was written for model {state.get('model_name')!r} with "
            f"{len(state.get('classes', ()))} classes, but this run trains {cfg.model!r} with "
            f"{len(splits.classes)}; use a fresh --out or drop --resume"
        )
    world = int(state.get("world", 1))
    batch = int(state.get("config", {}).get("batch_size", cfg.batch_size))
    if world * batch != rt.world * cfg.batch_size:
        keep = world * batch / rt.world
        hint = (
            f"--batch-size {int(keep)} with {rt.world} processes keeps it"
            if keep == int(keep)
            else f"resume with {world} processes"
        )
        raise CheckpointError(
            f"{uri} was written by {world} process(es) x batch {batch} (global batch "
            f"{world * batch}); this run has {rt.world} x {cfg.batch_size} = "
            f"{rt.world * cfg.batch_size}. The data position and LR schedule count global "
            f"batches, so it would not continue the same run: {hint}, or use a fresh --out"
        )
    saved = state.get("lineage") or {}
    if saved.get("manifest_sha256") and saved["manifest_sha256"] != splits.manifest_sha256:
        raise CheckpointError(
            f"{uri} was trained on manifest {saved.get('manifest_uri')} (sha256 "
            f"{saved['manifest_sha256'][:12]}...), but this run reads {splits.manifest_uri} "
            f"(sha256 {splits.manifest_sha256[:12]}...): other rows change the data order, "
            "so the run would not continue. Resume with the same manifest, or use a fresh --out"
        )
    return state


def _preempted(signum: int, epoch: int, step: int, out_uri: str, rt: Runtime) -> None:
    """Wait for rank 0's checkpoint, then raise :class:`Preempted` (its message says how to
    resume; ``kaedama train`` prints it on rank 0)."""
    barrier(rt)
    raise Preempted(signum, epoch, step, storage.join(out_uri, LAST))


def fit(
    manifest_uri: str,
    out_uri: str,
    cfg: TrainConfig,
    *,
    runtime: Runtime | None = None,
    stop: StopSignal | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Train one model on the manifest's train split; keep ``best.pt`` and ``last.pt``.

    Training ends after ``cfg.epochs`` epochs, when ``cfg.time_budget`` is spent (checked
    before every step: the partial epoch is validated, ``best.pt``/``last.pt`` written
    and the test split evaluated; ``last.pt`` resumes mid-epoch), or when validation
    accuracy has not improved for ``cfg.early_stop_patience`` epochs. ``result["stop"]``
    says which, and how much of the budget was left.

    Args:
        manifest_uri: a split manifest (rows with split train/val/test and status kept).
        out_uri: output folder, local or ``gs://``.
        cfg: the training config (``cfg.trials`` is ignored here; see :func:`train`).
        runtime: an already initialised runtime (else one is set up and torn down here).
        stop: the :class:`StopSignal` the loop polls (a fresh one by default); its
            handlers are installed while the epochs run.
        clock: seconds, monotonic: what the time budget is measured with.

    Returns:
        A JSON-friendly result: best epoch and validation accuracy, test accuracy,
        history, class names and more (also written to ``result.json``).

    Raises:
        Preempted: a stop signal ended the run early; ``last.pt`` holds the state.
    """
    rt = runtime or init_runtime(cfg)
    try:
        return _fit(manifest_uri, out_uri, cfg, rt, stop or StopSignal(), clock)
    finally:
        if runtime is None:
            close_runtime(rt)


def _fit(
    manifest_uri: str,
    out_uri: str,
    cfg: TrainConfig,
    rt: Runtime,
    stop: StopSignal,
    clock: Callable[[], float],
) -> dict[str, Any]:
    started = time.perf_counter()
    clock_start = clock()
    splits = load_splits(manifest_uri)
    classes = splits.classes
    if len(classes) < 2:
        raise TrainError(f"need at least 2 classes to train a classifier, found {list(classes)}")
    seed_everything(derive_seed(cfg.seed, _INIT), rt.device)  # same initial weights on every rank
    model = create_from_config(cfg, len(classes))
    init_report = None
    resuming = cfg.resume and storage.exists(storage.join(out_uri, LAST))
    if cfg.init_from and not resuming:  # a resumed run already holds the initialised weights
        init_report = init_from_checkpoint(model, cfg.init_from, cfg.model, classes)
        if rt.is_main:
            log.info(
                "initialised from %s: head %s, classes added %s, removed %s",
                cfg.init_from,
                init_report["head"],
                init_report["classes_added"] or "none",
                init_report["classes_removed"] or "none",
            )
    data_config = resolve_data_config(model, cfg.img_size, max_pixels=cfg.max_pixels)
    model.to(rt.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(splits, data_config, cfg, rt)
    if loaders.steps_per_epoch < 1:
        raise TrainError("the training split yields no batch; lower --batch-size")
    optimizer = optim.build_optimizer(model, cfg)
    scheduler = optim.build_scheduler(optimizer, cfg, loaders.steps_per_epoch)
    dtype = amp_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
    ema = optim.ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start_epoch, start_step, partial, budget_used = 0, 0, None, 0.0
    best: dict[str, Any] = {"epoch": 0, "val_acc": None}
    history: list[dict[str, Any]] = []
    state = _resume_state(out_uri, cfg, splits, rt)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best, history = dict(state["best"]), list(state["history"])
        budget_used = float(state.get("budget_used_s", 0.0))  # by the runs before this one
        init_report = (state.get("lineage") or {}).get("init_from")
        if start_step and rt.is_main:
            # Metric sums of the interrupted epoch (already summed over ranks).
            partial = state["partial"]
        log.info("resuming %s at epoch %d step %d", out_uri, start_epoch + 1, start_step)

    net: nn.Module = torch.compile(model) if cfg.compile else model
    train_model: nn.Module = net
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    mixer = augment.BatchMixer(cfg, len(classes))
    ctx = StepContext(
        train_model,
        optimizer,
        scheduler,
        scaler,
        mixer,
        ema,
        cfg,
        rt,
        dtype,
        input_size(data_config),
        stop=stop,
        clock=clock,
    )
    budget = cfg.budget_seconds
    if budget is not None:
        ctx.deadline = clock_start + budget - budget_used

    def used() -> float:
        return budget_used + clock() - clock_start

    eval_model = ema.module if ema is not None else net
    board = Board(out_uri, enabled=rt.is_main)
    meta = {
        "model_name": cfg.model,
        "classes": list(classes),
        "data_config": data_config,
        "config": config_to_dict(cfg),
        "lineage": {**lineage(splits, cfg), "init_from": init_report},
    }
    best_state: dict[str, torch.Tensor] | None = None
    epoch_seconds = 0.0

    def save_last(epoch: int, step: int, sums: torch.Tensor | None, seconds: float) -> None:
        state = {
            **meta,
            "model": unwrap(model).state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "partial": {"sums": sums, "seconds": seconds} if sums is not None else None,
            "best": best,
            "history": history,
            "seed": cfg.seed,
            "world": rt.world,
            "budget_used_s": used(),
        }
        save_checkpoint(storage.join(out_uri, LAST), state)

    def on_step(epoch: int, t0: float) -> Callable[[int, torch.Tensor], None]:
        def hook(step: int, sums: torch.Tensor) -> None:
            n = cfg.checkpoint_every_steps
            if n <= 0 or step % n or step >= loaders.steps_per_epoch:
                return
            total = all_sum(sums, rt).cpu()  # every rank reaches this step together
            if rt.is_main:
                save_last(epoch, step, total, epoch_seconds + time.perf_counter() - t0)
            barrier(rt)

        return hook

    def save_best(epoch: int, step: int = 0) -> None:
        nonlocal best_state
        best_state = _state_copy(unwrap(eval_model))
        if rt.is_main:
            save_checkpoint(
                storage.join(out_uri, BEST),
                {
                    **meta,
                    "model": best_state,
                    "epoch": epoch,
                    "step": step,
                    "val_acc": best["val_acc"],
                },
            )

    def _out_of_time(epoch: int, step: int, total: torch.Tensor, seconds: float) -> None:
        """Budget spent before step ``step`` of ``epoch``: keep a resumable position and
        let the partial epoch's weights compete for best.pt."""
        nonlocal best
        if rt.is_main:
            log.info("time budget spent at epoch %d step %d: stopping", epoch + 1, step)
        if step > 0 and loaders.val is not None:
            val = evaluate(
                eval_model, loaders.val, rt, dtype=dtype, channels_last=cfg.channels_last
            )
            if val["acc"] is not None and (best["val_acc"] is None or val["acc"] > best["val_acc"]):
                best = {"epoch": epoch + 1, "step": step, "val_acc": val["acc"]}
                save_best(epoch + 1, step)
        elif step > 0 and best["val_acc"] is None:  # no validation split: the latest counts
            best = {"epoch": epoch + 1, "step": step, "val_acc": None}
            save_best(epoch + 1, step)
        if rt.is_main:
            save_last(epoch, step, total, seconds)
        barrier(rt)

    stop_reason = "epochs"
    patience = cfg.early_stop_patience
    # From here on SIGTERM/SIGINT stop the run at the next step with a resumable last.pt.
    with ctx.stop:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                # Checked before an epoch (not after), so a resumed run that had already
                # stopped for lack of improvement stops again instead of training on.
                if (
                    patience
                    and start_step == 0
                    and best["val_acc"] is not None
                    and epoch - best["epoch"] >= patience
                ):
                    stop_reason = "no_improvement"
                    break
                loaders.train.sampler.set_epoch(epoch, start=start_step * cfg.batch_size)
                carried, epoch_seconds = None, 0.0
                if partial is not None:
                    carried, epoch_seconds = partial["sums"], float(partial["seconds"])
                t0 = time.perf_counter()
                progress = train_one_epoch(
                    ctx,
                    loaders.train,
                    epoch=epoch,
                    steps=loaders.steps_per_epoch,
                    start_step=start_step,
                    sums=carried,
                    on_step=on_step(epoch, t0),
                )
                seconds = epoch_seconds + time.perf_counter() - t0
                start_step, partial = 0, None
                total = all_sum(progress.sums, rt).cpu()
                # A signal that came during the epoch's last step stops the run before evaluation.
                signum = progress.stopped or consensus(0, ctx.stop.received(), rt)[1]
                if signum:
                    if rt.is_main:
                        save_last(epoch, progress.steps_done, total, seconds)
                    _preempted(signum, epoch, progress.steps_done, out_uri, rt)
                if progress.out_of_time:
                    stop_reason = "time_budget"
                    _out_of_time(epoch, progress.steps_done, total, seconds)
                    break
                n = float(total[COUNT])
                record: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "train_loss": float(total[LOSS]) / n if n else None,
                    "train_acc": float(total[CORRECT]) / n if n else None,
                    "train_images": int(n),
                    "train_skipped": int(total[SKIPPED]),
                    "images_per_s": n / seconds if seconds > 0 else 0.0,
                    "epoch_seconds": seconds,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                if loaders.val is not None:
                    val = evaluate(
                        eval_model, loaders.val, rt, dtype=dtype, channels_last=cfg.channels_last
                    )
                    record.update(
                        val_loss=val["loss"],
                        val_acc=val["acc"],
                        val_images=val["images"],
                        val_skipped=val["skipped"],
                    )
                history.append(record)
                # Without a validation split the last epoch counts as the best one.
                score = record.get("val_acc")
                improved = score is None or best["val_acc"] is None or score > best["val_acc"]
                if improved:
                    best = {"epoch": epoch + 1, "val_acc": score}
                if rt.is_main:
                    log.info(
                        "epoch %d/%d train_loss %s train_acc %s val_acc %s %.1f img/s",
                        epoch + 1,
                        cfg.epochs,
                        _fmt(record["train_loss"]),
                        _fmt(record["train_acc"]),
                        _fmt(record.get("val_acc")),
                        record["images_per_s"],
                    )
                if improved:
                    save_best(epoch + 1)
                if rt.is_main:
                    save_last(epoch + 1, 0, None, 0.0)
                    write_history(out_uri, history)
                    board.scalars(record, epoch + 1)
                barrier(rt)
                if epoch + 1 < cfg.epochs:  # a signal during evaluation: last.pt is already written
                    signum = consensus(0, ctx.stop.received(), rt)[1]
                    if signum:
                        _preempted(signum, epoch + 1, 0, out_uri, rt)
        except Preempted:
            board.close()
            raise

    result: dict[str, Any] = {
        "out": out_uri,
        "model": cfg.model,
        "classes": list(classes),
        "seed": cfg.seed,
        "world_size": rt.world,
        "lineage": meta["lineage"],
        # Val/test rows whose label never occurs in train: left out of every figure.
        "unknown_label_images": sum(splits.unknown_labels.values()),
        "unknown_labels": splits.unknown_labels,
        "epochs": cfg.epochs,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        # Why training ended: "epochs" (all done), "time_budget" or "no_improvement".
        "stop": {
            "reason": stop_reason,
            "epochs_done": len(history),
            "time_budget_s": budget,
            "budget_left_s": None if budget is None else max(budget - used(), 0.0),
            "early_stop_patience": patience,
        },
        "history": history,
        # DDP keeps replicas identical; every rank's fingerprint of its final weights shows it.
        "rank_fingerprints": [f.tolist() for f in all_gather(weights_fingerprint(model), rt)],
    }
    if loaders.test is not None:
        if best_state is None:  # best epoch was before a resume: read its weights back
            best_state = load_checkpoint(storage.join(out_uri, BEST))["model"]
        test_model = unwrap(eval_model)
        test_model.load_state_dict(best_state)
        test = evaluate(test_model, loaders.test, rt, dtype=dtype, channels_last=cfg.channels_last)
        result.update(
            test_acc=test["acc"],
            test_loss=test["loss"],
            test_images=test["images"],
            test_skipped=test["skipped"],
        )
    result["wall_seconds"] = time.perf_counter() - started
    if rt.is_main:
        storage.write_text(storage.join(out_uri, "result.json"), json.dumps(result, indent=2))
    board.close()
    barrier(rt)
    return result


def train(manifest_uri: str, out_uri: str, cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg.trials`` training runs with seeds ``seed, seed+1, ...`` and summarise them.

    One trial writes straight into ``out_uri``; several write ``trial-0``, ``trial-1``,
    ... and a ``summary.json`` with the mean and standard deviation of the best
    validation and the test accuracy.
    """
    if cfg.trials < 1:
        raise TrainError(f"trials must be >= 1, got {cfg.trials}")
    rt = init_runtime(cfg)
    try:
        if cfg.trials == 1:
            return fit(manifest_uri, out_uri, cfg, runtime=rt)
        results = [
            fit(
                manifest_uri,
                storage.join(out_uri, f"trial-{i}"),
                replace(cfg, seed=cfg.seed + i, trials=1),
                runtime=rt,
            )
            for i in range(cfg.trials)
        ]
        summary: dict[str, Any] = {"out": out_uri, "trials": cfg.trials, "runs": results}
        for key in ("best_val_acc", "test_acc"):
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                summary[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
        if rt.is_main:
            storage.write_text(storage.join(out_uri, "summary.json"), json.dumps(summary, indent=2))
        return summary
    finally:
        close_runtime(rt)
