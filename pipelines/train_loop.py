"""The loop every Ray Train worker runs: resume, then per epoch train on its share of the stream, validate,
checkpoint and report.

`train.py` (the driver) hands each worker a `LoopConfig`; the worker builds its `Worker` state once and
runs `run_epoch` until the last epoch. Metrics go to MLflow from rank 0 (`tracking.RunTracker`).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch

from slowfast.model import SlowFast, freeze_batch_norm, freeze_stages, load_checkpoint, save_checkpoint
from slowfast.shards.reader import iter_clips
from slowfast.train import LRSchedule, build_optimizer, memory_format, scaled_lr, topk_correct, train_step
from slowfast.train.evaluation import EvalTotals, score_views
from slowfast.train.optim import describe_precision

from .checkpoints import CHECKPOINT_FILE, SCORE
from .config import PipelineConfig
from .storage import Storage
from .tracking import RunTracker
from .train_input import SHUFFLE_BATCHES

# Workers log through Ray Train's logging (to the driver's console); a print there comes out twice.
_log = logging.getLogger("pipelines.train")


@dataclass
class LoopConfig:
    """What the driver hands every worker."""

    cfg: PipelineConfig
    store: Storage
    classes: list[str]
    val_shards: list[tuple[str, list[str]]]  # (path as the storage's filesystem takes it, video ids to skip)
    val_views: list[int]  # the stored eval views validation scores (sampling.choose_views)
    train_clips: int  # an epoch: its steps are train_clips // (batch_size x the workers running)
    tracking_uri: str
    mlflow_run_id: str
    run_name: str
    init_weights: object = None  # a Ray object ref of a state dict, used when the run has no checkpoint yet


@dataclass
class EpochSums:
    """One worker's running totals over an epoch, summed over workers at its end."""

    loss_sum: float = 0.0
    correct: float = 0.0
    clips: float = 0.0
    data_wait_s: float = 0.0
    loop_s: float = 0.0

    def add(self, loss: float, correct: int, clips: int, waited: float, step_s: float) -> None:
        self.loss_sum += loss * clips
        self.correct += correct
        self.clips += clips
        self.data_wait_s += waited
        self.loop_s += step_s

    def all_summed(self, world: int, device: torch.device) -> EpochSums:
        return EpochSums(*_all_sum(torch.tensor(astuple(self), dtype=torch.float64), world, device).tolist())


@dataclass
class Worker:
    """A worker's training state: its place in the group, the network and what steps it."""

    rank: int
    world: int
    device: torch.device
    fmt: torch.memory_format
    net: SlowFast  # the network itself; `model` is it wrapped for DDP
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    tracker: RunTracker
    steps_per_epoch: int
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)


def train_func(config: dict) -> dict:
    """One Ray Train worker: resume, then per epoch train, validate, checkpoint."""
    import ray.train

    from .ray_runtime import stalled

    loop: LoopConfig = config["loop"]
    worker = start_worker(loop)
    shard = ray.train.get_dataset_shard("train")
    epoch = worker.start_epoch
    try:
        for epoch in range(worker.start_epoch, loop.cfg.train.epochs):
            run_epoch(worker, loop, shard, epoch)
    except Exception as exc:
        if not stalled(exc):
            raise
        # Ray Data made no progress for ray.data_wait_timeout_s (no CPU it may use): a clean stop that the
        # driver reports, rather than a failure that Ray Train would retry into the same wait.
        return {
            "stalled": {"epoch": epoch, "workers": worker.world, "error": str(exc).splitlines()[0]},
            "history": worker.history,
        }
    finally:
        worker.tracker.close()
    return {
        "resumed_from_epoch": worker.start_epoch,
        "epochs_run": loop.cfg.train.epochs - worker.start_epoch,
        "history": worker.history,
    }


def start_worker(loop: LoopConfig) -> Worker:
    """The network, optimizer and schedule, from the run's last checkpoint when there is one."""
    import ray
    import ray.train
    import ray.train.torch

    t = loop.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(t.threads_per_worker or max(1, math.ceil(t.cpus_per_worker)))
    torch.manual_seed(t.seed + rank)  # different dropout per worker; restored below on resume
    net = SlowFast(loop.cfg.model.to_slowfast_config(num_classes=len(loop.classes)))
    # The global batch is the workers actually running (train.num_workers may be elastic) times
    # batch_size, and the LR follows it linearly; an epoch is as many steps as cover train_clips.
    lr = scaled_lr(t.base_lr, t.batch_size * world)
    steps_per_epoch = max(1, loop.train_clips // (t.batch_size * world))
    schedule = LRSchedule(base_lr=lr, warmup_epochs=t.warmup_epochs, total_epochs=t.epochs)
    start_epoch, global_step, extra = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            extra = load_checkpoint(net, Path(folder) / CHECKPOINT_FILE).extra
        start_epoch, global_step = int(extra["epoch"]), int(extra["global_step"])
        # The run continues the schedule it started with, even if the config now says otherwise, scaled
        # to the workers running now when a node was lost (or came back) since the checkpoint.
        started_with = dict(extra["schedule"])
        was = int(extra.get("world", world))
        if was != world:
            scaled = started_with["base_lr"] * world / was
            if rank == 0:
                _log.warning(
                    f"resuming after epoch {start_epoch} on {world} worker(s), the checkpoint was written by "
                    f"{was}: global batch {t.batch_size * was} -> {t.batch_size * world}, LR "
                    f"{started_with['base_lr']:.4g} -> {scaled:.4g}, {steps_per_epoch} steps per epoch"
                )
            started_with["base_lr"] = scaled
        changed = [
            f"{k} {started_with[k]} -> {getattr(schedule, k)}"
            for k in ("base_lr", "warmup_epochs", "total_epochs")
            if started_with[k] != getattr(schedule, k)
        ]
        if changed and rank == 0:
            _log.warning(
                f"resuming with the checkpoint's LR schedule; the config now differs: "
                f"{', '.join(changed)} (use a new run name to start over)"
            )
        schedule.load_state_dict(started_with)
    elif loop.init_weights is not None:
        net.load_state_dict(ray.get(loop.init_weights))
    frozen = fine_tuning(net, loop.cfg)
    fmt = memory_format(device.type)
    model = ray.train.torch.prepare_model(net.to(memory_format=fmt))
    optimizer = build_optimizer(
        net, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov, head_lr_mult=t.head_lr_mult
    )
    if extra is not None:
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"][rank] if rank < len(extra["rng"]) else None)
    tracker = RunTracker(loop.tracking_uri, loop.mlflow_run_id, enabled=rank == 0)
    if rank == 0:
        # What the workers running decide (global batch, LR, steps) is a param of the first attempt; an
        # elastic run records every epoch's as metrics (workers, global_batch, base_lr).
        first = (
            {} if start_epoch else {"global_batch": t.batch_size * world, "lr": lr, "steps_per_epoch": steps_per_epoch}
        )
        tracker.params({**loop.cfg.flatten(), "num_classes": len(loop.classes), "run_name": loop.run_name, **first})
        if start_epoch:
            _log.info(f"resuming after epoch {start_epoch} (step {global_step})")
            if extra.get("metrics") and not tracker.logged("train_loss", start_epoch):
                log_epoch(tracker, extra["metrics"])  # killed between the checkpoint's commit and the logging
        _log.info(f"precision: {describe_precision(device.type, t.mixed_precision)}")
        if frozen:
            _log.info(f"fine-tuning: {frozen}")
    return Worker(
        rank, world, device, fmt, net, model, optimizer, schedule, tracker, steps_per_epoch, start_epoch, global_step
    )


def fine_tuning(net: SlowFast, cfg: PipelineConfig) -> str:
    """Apply train.freeze_up_to and train.freeze_bn to the network (before DDP and the optimizer see it);
    returns what was frozen, for the log ("" when nothing)."""
    t, done = cfg.train, []
    if t.freeze_up_to != "none":
        done.append(f"{len(freeze_stages(net, t.freeze_up_to))} parameter tensors frozen up to {t.freeze_up_to}")
    if t.freeze_bn:
        done.append(f"{freeze_batch_norm(net)} more batch norms frozen")
    if t.head_lr_mult != 1.0:
        done.append(f"head learning rate x{t.head_lr_mult:g}")
    return "; ".join(done)


def run_epoch(w: Worker, loop: LoopConfig, shard, epoch: int) -> dict:
    """The epoch's steps over this worker's share of the stream, validation, a checkpoint and a report."""
    import ray.train

    t = loop.cfg.train
    w.model.train()
    sums = EpochSums()
    epoch_start = wait_start = time.perf_counter()
    # read_shards mixes a few shards; this buffer mixes clips across those groups.
    batches = shard.iter_torch_batches(
        batch_size=t.batch_size,
        drop_last=True,
        device=w.device,
        prefetch_batches=2,
        local_shuffle_buffer_size=SHUFFLE_BATCHES * t.batch_size,
    )
    for step, batch in enumerate(batches):
        waited = time.perf_counter() - wait_start
        step_lr = w.schedule.step(w.optimizer, epoch, step, w.steps_per_epoch)
        out = train_step(
            w.model,
            w.optimizer,
            batch,
            fmt=w.fmt,
            mixed_precision=t.mixed_precision,
            grad_clip=t.grad_clip,
            clipped=w.net,
        )
        n = len(batch["label"])
        loss = out.loss.item()  # waits for the device: the step is done
        step_s = time.perf_counter() - wait_start
        sums.add(loss, topk_correct(out.logits.detach(), batch["label"], (1,))[1], n, waited, step_s)
        w.global_step += 1
        w.tracker.metrics(
            {
                "loss": loss,
                "lr": step_lr,
                "clips_per_s": n * w.world / step_s,
                "data_wait": waited / step_s,
                "grad_norm": out.grad_norm,
            },
            step=w.global_step,
            wait=False,
        )
        wait_start = time.perf_counter()
    sums = sums.all_summed(w.world, w.device)
    epoch_s = time.perf_counter() - epoch_start
    metrics = {
        "epoch": epoch + 1,
        "global_step": w.global_step,
        "train_loss": sums.loss_sum / max(sums.clips, 1),
        "train_top1": sums.correct / max(sums.clips, 1),
        "train_clips": int(sums.clips),
        "epoch_clips_per_s": sums.clips / epoch_s,
        "epoch_data_wait": sums.data_wait_s / max(sums.loop_s, 1e-9),
        "epoch_s": epoch_s,
        "workers": w.world,
        "global_batch": t.batch_size * w.world,
        "base_lr": w.schedule.base_lr,
        **validate(w, loop),
    }
    w.history.append(metrics)
    if w.rank == 0:
        left = (t.epochs - epoch - 1) * (time.perf_counter() - epoch_start)
        _log.info(
            f"epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f}, train top-1 "
            f"{metrics['train_top1']:.3f}, {SCORE} {metrics[SCORE]:.3f}, {metrics['epoch_clips_per_s']:.1f} "
            f"clips/s, data wait {metrics['epoch_data_wait']:.0%}, {epoch_s:.0f}s, ETA {left / 60:.1f} min"
        )
    rng = _all_gather(rng_state(), w.world)
    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if w.rank == 0:
            save_checkpoint(
                w.net,
                Path(folder) / CHECKPOINT_FILE,
                optimizer=w.optimizer.state_dict(),
                schedule=w.schedule.state_dict(),
                epoch=epoch + 1,
                global_step=w.global_step,
                world=w.world,
                rng=rng,
                metrics=metrics,
                class_names=loop.classes,
            )
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
    if w.rank == 0:
        # The epoch's figures go to MLflow once Ray Train has committed its checkpoint (written it into the
        # snapshot a resumed run starts from): a run killed before that re-runs the epoch and logs it then,
        # one killed after it logs them on resuming (start_worker), so each epoch is logged once.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        log_epoch(w.tracker, metrics)
    return metrics


def log_epoch(tracker: RunTracker, metrics: dict) -> None:
    """An epoch's figures (as run_epoch reports them and the checkpoint keeps them) at step = the epoch."""
    tracker.metrics({k: v for k, v in metrics.items() if k not in ("epoch", "global_step")}, step=metrics["epoch"])


def validate(w: Worker, loop: LoopConfig) -> dict:
    """Video-level top-1/top-5 over the chosen views (centre crop) of the val shards, files split by rank."""
    t = loop.cfg.train
    mine = [(p, set(s)) for p, s in loop.val_shards[w.rank :: w.world]]
    batches = iter_clips(
        mine,
        mode="eval",
        batch_size=t.batch_size,
        crop=t.crop_size,
        filesystem=loop.store.fs,
        spatial_crops=1,
        views=loop.val_views,
    )
    part = score_views(w.net, batches, device=w.device, fmt=w.fmt, mixed_precision=t.mixed_precision)
    w.net.train()
    total = EvalTotals.merged(_all_gather(part.state_dict(), w.world))
    res = total.videos.results(len(loop.classes))
    return {
        "val_top1": res["top1"],
        "val_top5": res["top5"],
        "val_mean_class_accuracy": res["mean_class_accuracy"],
        "val_loss": total.clip_loss,
        "val_clip_top1": total.clip_top1,
        "val_videos": res["num_videos"],
    }


# --- distributed and RNG helpers ----------------------------------------------------------------------


def _all_sum(x: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Sum over workers, on the training device (gloo reduces CPU tensors, nccl GPU ones)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        y = x.to(device)
        dist.all_reduce(y)
        return y.cpu()
    return x


def _all_gather(obj, world: int) -> list:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def rng_state() -> dict:
    """Every generator the loop draws from, in weights-only loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
