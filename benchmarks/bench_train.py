"""Train benchmark: train throughput in clips/s reading shards (Ray Data -> Ray Train, the real `train` step)
against the same train step fed one in-memory batch (no I/O), in fp32 and in bf16 (train.mixed_precision) side
by side; goal: ratio >= 0.95. On a CPU without bf16 in hardware, where autocast keeps fp32, bf16 is not run
(the report says why).

    python -m pipelines bench train                       # the demo's model and data, CPU; ~6 minutes on 2 cores
    python -m pipelines bench train --steps 40 --precision fp32 --json out/bench_train.json
    python -m pipelines bench train --device cuda --preset slowfast_8x8_r50 --batch-size 16

Data: the project's synthetic motion set (configs/demo.yaml's data.synth), generated once into --workdir and
preprocessed there by the project's own preprocess step (shards and manifests under --workdir/storage, reused
by later runs with the same settings). Crop, short side and jitter are the demo's for the tiny presets (64 from
[72, 90]); other presets get the paper's (224 from [256, 320]), from videos rendered at that short side.

shards: `pipelines.train.train` itself, one epoch per precision: TorchTrainer with 1 worker (train.cpus_per_worker
  1 CPU reserved, train.threads_per_worker = --threads torch threads) on train_dataset + data_config (read_shards ->
  ClipTransform tasks, capped at ray.data_cpus), and train_func's loop (iter_torch_batches with its batch size,
  prefetch and local shuffle buffer, then slowfast.train.train_step). The figures are the ones train_func logs per
  step to MLflow (clips_per_s, data_wait), read back after the run, over --steps steps after --warmup. Running the
  real trainer rather than driving the Dataset from this process is practical here (a few seconds of start-up) and
  is the only way to measure what training sees: the streaming_split coordinator, the worker process and the CPU
  contention between the train worker and the Ray Data tasks are all in it. The MLflow timestamps of the same
  steps also give the wall-clock rate, which includes the per-step MLflow write that train_func's own step timer
  leaves out.
memory: the same slowfast.train.train_step (clip_inputs: the crop box's flip and resize, the slow pathway by index
  and normalisation on the device; forward, backward, SGD) with the same model (same seed), optimizer and LR
  schedule, in a Ray worker process holding the train worker's resources, with its torch threads
  (train.threads_per_worker) and memory format (slowfast.train.memory_format), fed one batch as train_func
  receives it (TRAIN_COLUMNS: uint8 crop boxes, where they lie, slow indices and labels from the same shards,
  already on the device). All the shards case does beyond it is the data path, so its ratio to memory is at
  most 1 unless the machine's load moved between the cases: half of the memory steps run before the
  shards case and half after, so that a drift hits both.
Per CPU second: clips per CPU second of the process that runs the step (the train worker, the memory task), and for
  the shards case also of the train worker and the Ray Data workers together: the whole CPU cost of a clip.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script or loaded by path: make `benchmarks` and `pipelines` importable
    sys.path.insert(0, str(_ROOT))

from benchmarks._common import CoreUse, environment, format_table, ratio, write_json  # noqa: E402
from pipelines.config import PipelineConfig, load_config  # noqa: E402
from pipelines.data import ensure_videos, storage_of  # noqa: E402
from pipelines.ray_runtime import init_ray  # noqa: E402
from pipelines.train import TrainData, prepare_data, train  # noqa: E402
from pipelines.train_input import TRAIN_COLUMNS, data_cpu_split  # noqa: E402
from slowfast.model import PRESETS, SlowFast  # noqa: E402
from slowfast.train import LRSchedule, build_optimizer, memory_format, scaled_lr, topk_correct, train_step  # noqa: E402
from slowfast.train.optim import autocast, cpu_bf16, describe_precision  # noqa: E402

DEMO_CONFIG = _ROOT / "configs" / "demo.yaml"
GOAL = 0.95
# Crop, short side (stored frames and generated videos) and scale jitter: the demo's for the tiny presets,
# the paper's for the others.
DEMO_CROP, DEMO_SHORT_SIDE, DEMO_JITTER, DEMO_VIDEO_SIZE = 64, 72, (72, 90), 96
PAPER_CROP = 224
PRECISIONS = {"fp32": False, "bf16": True}  # --precision name -> train.mixed_precision


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the config and the shards ---------------------------------------------------------------------------


def frame_sizes(crop: int) -> tuple[int, tuple[int, int], int]:
    """(short side, scale jitter, generated video height) for `crop`: the demo's at its crop, else the
    paper's proportions (224 from a short side in [256, 320])."""
    if crop == DEMO_CROP:
        return DEMO_SHORT_SIDE, DEMO_JITTER, DEMO_VIDEO_SIZE
    short = 2 * math.ceil(crop * 8 / 7 / 2)
    return short, (short, 2 * math.ceil(short * 1.25 / 2)), max(short, 32)


def bench_config(args, clips_per_video: int | None = None) -> PipelineConfig:
    """configs/demo.yaml pointed at --workdir; `clips_per_video` None = the demo's."""
    demo = load_config(DEMO_CONFIG)
    synth = demo.data.synth
    model = PRESETS[args.preset]
    short, jitter, video_size = frame_sizes(args.crop)
    fps = demo.preprocess.target_fps
    seconds = max(synth.seconds, math.ceil((model.T * model.tau / fps + 0.5) * 2) / 2)  # a whole clip fits
    classes, per_class = args.classes, args.videos_per_class
    clips = clips_per_video or demo.preprocess.clips_per_video
    videos = args.workdir / f"videos-{video_size}px-{seconds:g}s-{classes}x{per_class}"
    cuda = args.device == "cuda"
    data_cpus = args.data_cpus if args.data_cpus is not None else (max(1, (os.cpu_count() or 2) - 2) if cuda else 1)
    overrides = {
        "name": "bench-train",
        "storage_root": args.workdir / "storage",
        "data.dataset": f"synth_{video_size}px_{seconds:g}s_{classes}x{per_class}",
        "data.video_root": videos,
        "data.annotations.train": videos / "annotations/train.csv",
        "data.annotations.val": videos / "annotations/val.csv",
        "data.synth.classes": classes,
        "data.synth.videos_per_class": per_class,
        "data.synth.size": video_size,
        "data.synth.seconds": seconds,
        "preprocess.short_side": short,
        "preprocess.clips_per_video": clips,
        "model.preset": args.preset,
        "train.epochs": 1,
        "train.warmup_epochs": 0,
        "train.batch_size": args.batch_size,
        "train.crop_size": args.crop,
        "train.scale_jitter": f"[{jitter[0]}, {jitter[1]}]",
        "train.num_workers": 1,
        "train.cpus_per_worker": 1,
        "train.threads_per_worker": args.threads,
        "train.use_gpu": str(cuda).lower(),
        "mlflow.tracking_uri": f"sqlite:///{args.workdir / 'mlflow.db'}",
        "mlflow.experiment": "bench-train",
        "ray.data_cpus": data_cpus,
    }
    return load_config(DEMO_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def sized_config(args) -> PipelineConfig:
    """The synthetic videos generated (once), then the config whose one epoch holds --warmup + --steps steps."""
    cfg = bench_config(args)
    ensure_videos(cfg, log)
    with open(cfg.data.annotations[cfg.data.train_split], newline="") as f:
        train_videos = sum(1 for _ in csv.DictReader(f))
    clips = math.ceil((args.warmup + args.steps) * args.batch_size / train_videos)
    clips += clips % 2  # fewer distinct preprocessing hashes (= re-decodes) as --steps changes
    return bench_config(args, clips)


# -- who got the cores -----------------------------------------------------------------------------------


class TrainCores(CoreUse):
    """CoreUse for a training run: the Ray Train worker, and Ray Data's map operators feeding it, which run as
    tasks (ray::MapBatches(train_clips), fused ones joined by "->") or in actor pools (ray::MapWorker(...))."""

    ROLES = {"train_worker": (b"ray::RayTrainWorker",), "data_workers": (b"ray::MapWorker", b"ray::MapBatches")}


# -- memory: one batch, no I/O ---------------------------------------------------------------------------


def one_batch(cfg: PipelineConfig, data: TrainData, device: torch.device) -> dict[str, torch.Tensor]:
    """A train batch from the shards as train_func receives it (TRAIN_COLUMNS: uint8 fast frames, slow indices,
    labels; the crops, dtypes, shapes and layout training reads), on the device."""
    from slowfast.shards.reader import iter_clips

    t = cfg.train
    store = storage_of(cfg)
    shards = [(store.path(p), skip) for p, skip in data.train_shards]
    batches = iter_clips(
        shards,
        mode="train",
        batch_size=t.batch_size,
        crop=t.crop_size,
        meta=data.train_meta,
        filesystem=store.fs,
        jitter=t.scale_jitter,
        seed=t.seed,
        drop_last=True,
    )
    batch = next(iter(batches))
    return {k: batch[k].to(device) for k in TRAIN_COLUMNS}


def memory_case(
    cfg: PipelineConfig, data: TrainData, device: torch.device, steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Seconds per step of train_func's step body on one in-memory batch, after `warmup` untimed steps: wall
    clock, and CPU time of the process. Run it with run_memory_case, in a Ray worker process like the train
    worker's."""
    t = cfg.train
    torch.set_num_threads(t.threads_per_worker)  # as train_loop.start_worker sets them
    fmt = memory_format(device.type)
    torch.manual_seed(t.seed)  # train_func's seed for rank 0: the same initial weights
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(data.classes)))
    model = net.to(device, memory_format=fmt)
    lr = scaled_lr(t.base_lr, t.batch_size)
    schedule = LRSchedule(base_lr=lr, warmup_epochs=t.warmup_epochs, total_epochs=t.epochs)
    optimizer = build_optimizer(net, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
    batch = one_batch(cfg, data, device)
    total = warmup + steps
    model.train()
    wall, cpu = [], []
    for step in range(total):
        start, start_cpu = time.perf_counter(), time.process_time()
        schedule.step(optimizer, 0, step, total)
        out = train_step(
            model, optimizer, batch, fmt=fmt, mixed_precision=t.mixed_precision, grad_clip=t.grad_clip, clipped=net
        )
        out.loss.item()  # waits for the device: the step is done
        topk_correct(out.logits.detach(), batch["label"], (1,))
        if step >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    del model, net, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the train worker
    return wall, cpu


def run_memory_case(
    cfg: PipelineConfig, data: TrainData, device: torch.device, steps: int, warmup: int
) -> tuple[list[float], list[float]]:
    """memory_case in a fresh Ray worker process holding the train worker's resources: the same kind of process
    as the train worker (Ray's threads in it included, so per-CPU-second figures compare like with like), and
    not the driver, whose own Ray threads would be charged to the step."""
    import ray

    # By its package name, which Ray's workers (started in the checkout) can import: loaded by path, as
    # `pipelines bench` and the tests load it, this module's own name means nothing to them.
    case = importlib.import_module("benchmarks.bench_train").memory_case
    task = ray.remote(num_cpus=cfg.train.cpus_per_worker, num_gpus=1 if device.type == "cuda" else 0, max_calls=1)(case)
    return ray.get(task.remote(cfg, data, device, steps, warmup))


# -- shards: the real train step -------------------------------------------------------------------------


def shards_case(cfg: PipelineConfig, steps: int, warmup: int) -> dict:
    """One epoch of `pipelines.train.train`; the per-step figures train_func logged, read back from MLflow."""
    from mlflow.tracking import MlflowClient

    run_name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    store = storage_of(cfg)
    started = time.perf_counter()
    try:
        with TrainCores() as cores:
            out = train(cfg, run_name=run_name, log=log)
    finally:
        shutil.rmtree(store.path("checkpoints", run_name), ignore_errors=True)  # a benchmark's model is not kept
    wall = time.perf_counter() - started
    client = MlflowClient(out["tracking_uri"])
    history = {
        key: sorted(client.get_metric_history(out["mlflow_run_id"], key), key=lambda m: m.step)
        for key in ("clips_per_s", "data_wait")
    }
    logged = len(history["clips_per_s"])
    if logged < 2:
        raise RuntimeError(f"bench train: the trainer logged {logged} step(s); it needs at least 2")
    if logged < warmup + steps:
        log(
            f"bench train: the epoch had {logged} steps, fewer than --warmup {warmup} + --steps {steps}; "
            f"timing the last {logged - min(warmup, logged - 1)}"
        )
    warmup = min(warmup, logged - 1)
    chosen = slice(warmup, min(logged, warmup + steps))
    batch = cfg.train.batch_size * cfg.train.workers_range[1]
    step_s = [batch / m.value for m in history["clips_per_s"]]
    waited = [w.value * s for w, s in zip(history["data_wait"], step_s, strict=True)]
    timed, timed_wait = step_s[chosen], waited[chosen]
    # MLflow timestamps (ms) of the timed steps' logs: the whole period per step, the log write included.
    stamps = [m.timestamp for m in history["clips_per_s"]]
    first = chosen.start - 1  # the log just before the first timed step
    span_s = (stamps[chosen.stop - 1] - stamps[first]) / 1e3
    used = cores.between(stamps[first] / 1e3, stamps[chosen.stop - 1] / 1e3)
    wall_rate = len(timed) * batch / span_s if span_s > 0 else None
    metrics = out["metrics"]
    return {
        "run_name": run_name,
        "steps": len(timed),
        "warmup": warmup,
        "steps_in_epoch": logged,
        "clips_per_s": len(timed) * batch / sum(timed),
        "data_wait": sum(timed_wait) / sum(timed),
        "median_step_ms": 1e3 * statistics.median(timed),
        "wall_clips_per_s": wall_rate,
        # Per CPU second of the train worker process (its torch threads and Ray's iterator threads in it), and of
        # the worker and the Ray Data workers together.
        "clips_per_cpu_s": wall_rate / used["train_worker_cores"]
        if wall_rate and used.get("train_worker_cores")
        else None,
        "clips_per_cpu_s_with_data": wall_rate / (used["train_worker_cores"] + used["data_workers_cores"])
        if wall_rate and used.get("train_worker_cores")
        else None,
        "first_step_wait_s": waited[0],
        "epoch_s": metrics.get("epoch_s"),
        "epoch_clips_per_s": metrics.get("epoch_clips_per_s"),
        "epoch_data_wait": metrics.get("epoch_data_wait"),
        "untimed_s_per_step": (metrics["epoch_s"] - sum(step_s)) / logged if "epoch_s" in metrics else None,
        "cores": used,
        "train_wall_s": wall,
        "step_ms": [round(1e3 * s, 1) for s in step_s],
        "data_wait_ms": [round(1e3 * w, 1) for w in waited],
    }


# -- the table -------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


def goal_met(run: dict) -> bool:
    """The goal: the shards case at GOAL or more of the in-memory case's clips/s (train_func's step timer)."""
    return (ratio(run["shards"]["clips_per_s"], run["memory"]["clips_per_s"]) or 0.0) >= GOAL


def table_rows(runs: dict) -> list[list]:
    rows = []
    for name, run in runs.items():
        shards, memory = run["shards"], run["memory"]
        base, base_cpu = memory["clips_per_s"], memory["clips_per_cpu_s"]
        rows += [
            [
                name,
                "shards: Ray Data -> TorchTrainer, as train_func logs it",
                _f(shards["clips_per_s"]),
                _f(shards["clips_per_cpu_s"]),
                _f(shards["median_step_ms"]),
                _pct(shards["data_wait"]),
                _f(ratio(shards["clips_per_s"], base), 3),
                _f(ratio(shards["clips_per_cpu_s"], base_cpu), 3),
                f">= {GOAL} ({'met' if goal_met(run) else 'not met'})",
            ],
            [
                name,
                "shards: wall clock (MLflow timestamps); CPU: worker + Ray Data",
                _f(shards["wall_clips_per_s"]),
                _f(shards["clips_per_cpu_s_with_data"]),
                None,
                None,
                _f(ratio(shards["wall_clips_per_s"], base), 3),
                _f(ratio(shards["clips_per_cpu_s_with_data"], base_cpu), 3),
                None,
            ],
            [
                name,
                "memory: the same train_step on one pre-built batch",
                _f(base),
                _f(base_cpu),
                _f(memory["median_step_ms"]),
                _pct(0.0),
                "1.000",
                "1.000",
                None,
            ],
        ]
    return rows


def report(cfg: PipelineConfig, args, results: dict) -> str:
    runs = results["runs"]
    t = cfg.train
    first = next(iter(runs.values()))["shards"]
    title = (
        f"Train throughput: {args.preset}, batch {t.batch_size}, crop {t.crop_size} (short side "
        f"{cfg.preprocess.short_side}, jitter {list(t.scale_jitter)}), {args.device}, channels_last_3d, "
        f"{t.threads_per_worker} torch thread(s); {first['steps']} timed steps per case after "
        f"{first['warmup']} warm-up"
    )
    table = format_table(
        [
            "precision",
            "case",
            "clips/s",
            "clips/CPU-s",
            "median ms/step",
            "data wait",
            "ratio to memory",
            "ratio per CPU-s",
            "goal",
        ],
        table_rows(runs),
    )
    cores = os.cpu_count()
    notes = [
        f"Cores: {cores}. The train worker reserves train.cpus_per_worker {t.cpus_per_worker:g} CPU and runs "
        f"train.threads_per_worker {t.threads_per_worker} torch thread(s), as the memory case's Ray task does; Ray "
        f"Data: ray.data_cpus {cfg.ray.data_cpus:g} (read tasks + {results['data_actors']} ClipTransform task "
        "slot(s)).",
        "clips/s: train_func's step timer (data wait included, its per-step MLflow write not); clips/CPU-s: per CPU "
        "second of the process running the step\n(shards: the train worker; its wall-clock row: the worker and the "
        "Ray Data workers together). Data wait: time waiting for the next batch / step time.",
    ]
    for name, run in runs.items():
        shards, memory = run["shards"], run["memory"]
        notes.append(
            f"{name}: {run['precision']}. First step waited {shards['first_step_wait_s']:.2f} s (start-up, shuffle "
            f"buffer); epoch (all {shards['steps_in_epoch']} steps): {_f(shards['epoch_clips_per_s'])} clips/s, data "
            f"wait {_pct(shards['epoch_data_wait'])}, {_f(_ms(shards['untimed_s_per_step']))} ms/step outside the "
            f"step timer.\n  Memory halves (before / after the shards case): {_f(memory['before_clips_per_s'])} / "
            f"{_f(memory['after_clips_per_s'])} clips/s on {memory['cores']:.2f} cores (CPU time / wall time)."
            + (
                f" During the timed shards steps the train worker got {shards['cores']['train_worker_cores']:.2f} "
                f"cores, the Ray Data workers {shards['cores']['data_workers_cores']:.2f}, the machine was busy on "
                f"{shards['cores']['machine_busy_cores']:.2f} of {cores}."
                if shards["cores"]
                else ""
            )
        )
    if len(runs) == 2:
        step = runs["bf16"]["memory"]["median_step_ms"] / runs["fp32"]["memory"]["median_step_ms"]
        notes.append(f"bf16 / fp32 step time, memory case: {step:.2f}x.")
    for name, why in results["skipped"].items():
        notes.append(f"{name}: {why}.")
    if args.device == "cpu" and cores and cores <= 2:
        notes.append(
            "On 2 cores the train step and Ray Data compete for the cores (and for memory bandwidth); the "
            "memory case has them to itself."
        )
    load = results["load_average_max"]
    if load > (cores or 1) - 0.5:
        notes.append(
            f"Load average up to {load:.1f} on {cores} cores: other work shared the machine during the run. "
            "The wall-clock rates suffer, and the cases\nran one after the other, not interleaved; the "
            "per-CPU-second rates suffer less."
        )
    return title + "\n" + table + "\n" + "\n".join(notes)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench train", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="slowfast_tiny", choices=sorted(PRESETS), help="model preset")
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help=f"train crop (default {DEMO_CROP} for the tiny presets, as the demo; {PAPER_CROP} otherwise)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default: the demo's, 16)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, per case (default 5)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--precision",
        default="fp32,bf16",
        help="comma separated, among fp32 and bf16 (train.mixed_precision: bf16 autocast where "
        "slowfast.train.autocast gives it); default both",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the train worker and of the memory case (train.threads_per_worker; default: the demo's)",
    )
    parser.add_argument(
        "--data-cpus", type=float, default=None, help="ray.data_cpus (default 1; with cuda, all cores but 2)"
    )
    parser.add_argument("--classes", type=int, default=None, help="synthetic classes (default: the demo's, 6)")
    parser.add_argument("--videos-per-class", type=int, default=None, help="synthetic videos per class (default 24)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "slowfast-bench-train",
        help="videos, shards and the MLflow db go here, and are reused by later runs",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    demo = load_config(DEMO_CONFIG)
    args.crop = args.crop or (DEMO_CROP if "tiny" in args.preset else PAPER_CROP)
    args.batch_size = args.batch_size or demo.train.batch_size
    args.classes = args.classes or demo.data.synth.classes
    args.videos_per_class = args.videos_per_class or demo.data.synth.videos_per_class
    args.threads = args.threads or demo.train.threads_per_worker or max(1, math.ceil(demo.train.cpus_per_worker))
    args.workdir = args.workdir.resolve()
    args.precision = [p.strip() for p in args.precision.split(",") if p.strip()]
    if (
        not args.precision
        or not set(args.precision) <= set(PRECISIONS)
        or len(set(args.precision)) < len(args.precision)
    ):
        parser.error(f"--precision takes fp32 and/or bf16, each once; got {','.join(args.precision) or 'nothing'}")
    if min(args.steps, args.batch_size, args.threads) < 1 or args.warmup < 1:
        parser.error(
            "--steps, --batch-size, --threads and --warmup must be at least 1 (the first step waits for the pipeline)"
        )
    if args.crop < 16 or args.classes < 2 or args.videos_per_class < 2:
        parser.error("--crop must be at least 16, --classes and --videos-per-class at least 2")
    return args


def with_precision(cfg: PipelineConfig, mixed_precision: bool) -> PipelineConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"mixed_precision": mixed_precision})})


def measure(cfg: PipelineConfig, data: TrainData, device: torch.device, args, load: list[float]) -> dict:
    """Memory (half the steps), shards (one epoch), memory (the other half), for cfg's precision."""
    half = (args.steps + 1) // 2
    log(f"bench train: memory, {half} steps")
    before, before_cpu = run_memory_case(cfg, data, device, half, args.warmup)
    load.append(os.getloadavg()[0])
    log("bench train: shards (pipelines.train.train, one epoch)")
    shards = shards_case(cfg, args.steps, args.warmup)
    load.append(os.getloadavg()[0])
    log(f"bench train: memory, {args.steps - half} steps")
    after, after_cpu = (
        run_memory_case(cfg, data, device, args.steps - half, args.warmup) if args.steps > half else ([], [])
    )
    load.append(os.getloadavg()[0])
    batch = cfg.train.batch_size
    times, cpu = before + after, before_cpu + after_cpu
    memory = {
        "steps": len(times),
        "warmup": args.warmup,
        "clips_per_s": len(times) * batch / sum(times),
        "median_step_ms": 1e3 * statistics.median(times),
        "clips_per_cpu_s": len(times) * batch / sum(cpu),
        "cores": round(sum(cpu) / sum(times), 2),
        "before_clips_per_s": len(before) * batch / sum(before),
        "after_clips_per_s": len(after) * batch / sum(after) if after else None,
        "data_wait": 0.0,
        "step_ms": [round(1e3 * s, 1) for s in times],
        "step_cpu_ms": [round(1e3 * s, 1) for s in cpu],
    }
    mixed = cfg.train.mixed_precision
    return {
        "precision": describe_precision(device.type, mixed),
        "shards": shards,
        "memory": memory,
        "autocast": not isinstance(autocast(device.type, mixed), contextlib.nullcontext),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench train: --device cuda but CUDA is not available on this machine; run without it for CPU",
            file=sys.stderr,
        )
        return 2
    import ray

    cfg = sized_config(args)
    started_ray = not ray.is_initialized()
    if started_ray:
        # As `train` starts it: the job's cluster (RAY_ADDRESS) or a fresh local Ray of our own, never a `ray start`
        # instance someone else left running on this machine; with the dashboard, whose State API Ray Train's
        # placement-group cleaner asks about its controller (without it, it says so every few seconds).
        init_ray(cfg)
    device = torch.device(args.device)
    load = [os.getloadavg()[0]]
    runs, skipped = {}, {}
    if "bf16" in args.precision and args.device == "cpu" and not cpu_bf16().supported:
        # autocast keeps fp32 on such a CPU: a bf16 run would time fp32 a second time.
        skipped["bf16"] = f"not run: {cpu_bf16().reason}, so autocast keeps fp32 (its rows would repeat fp32's)"
    try:
        log(f"bench train: data in {args.workdir}")
        data = prepare_data(cfg, storage_of(cfg), log)
        for name in [p for p in args.precision if p not in skipped]:
            log(f"bench train: {name}")
            runs[name] = measure(with_precision(cfg, PRECISIONS[name]), data, device, args, load)
        env = environment(args.device)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    results = {
        "runs": runs,
        "skipped": skipped,
        "load_average_max": max(load),
        "data_actors": data_cpu_split(cfg.ray.data_cpus)[1],
    }
    print(report(cfg, args, results))
    if args.json:
        payload = {
            "benchmark": "train",
            "environment": env,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "config": {
                "preset": args.preset,
                "batch_size": cfg.train.batch_size,
                "crop": cfg.train.crop_size,
                "short_side": cfg.preprocess.short_side,
                "scale_jitter": list(cfg.train.scale_jitter),
                "clips_per_video": cfg.preprocess.clips_per_video,
                "train_clips": data.train_clips,
                "cpus_per_worker": cfg.train.cpus_per_worker,
                "threads": cfg.train.threads_per_worker,
                "data_cpus": cfg.ray.data_cpus,
                "device": args.device,
            },
            "precisions": {
                name: {
                    "mixed_precision": PRECISIONS[name],
                    "precision": run["precision"],
                    "autocast": run["autocast"],
                    "cases": {"shards": _rounded(run["shards"]), "memory": _rounded(run["memory"])},
                    "ratio_shards_over_memory": ratio(run["shards"]["clips_per_s"], run["memory"]["clips_per_s"]),
                    "goal_met": goal_met(run),
                    "ratio_wall_over_memory": ratio(run["shards"]["wall_clips_per_s"], run["memory"]["clips_per_s"]),
                    "ratio_per_cpu_s": ratio(run["shards"]["clips_per_cpu_s"], run["memory"]["clips_per_cpu_s"]),
                    "data_wait": round(run["shards"]["data_wait"], 4),
                }
                for name, run in runs.items()
            },
            "skipped": skipped,
            "goal_ratio": GOAL,
            "load_average_max": round(max(load), 2),
        }
        write_json(args.json, payload)
        print(f"results written to {args.json}")
    return 0


def _rounded(values: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


if __name__ == "__main__":
    sys.exit(main())
