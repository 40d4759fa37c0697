"""Ablation benchmark: the paper's SlowFast ablations (pathways, laterals, fusion, beta, fast-pathway input)
trained on the synthetic motion set with one step budget and several seeds, on a CPU.

    python benchmarks/bench_ablate.py --config configs/ablate.yaml                # the whole study
    python benchmarks/bench_ablate.py --config configs/ablate.yaml --variants slow_only,slowfast --seeds 1
    python benchmarks/bench_ablate.py --config configs/ablate.yaml --quick        # smoke test: 1 seed, 8 steps

`python -m pipelines bench ablate [options]` runs the same `main`.

The config's data is prepared once (synth, then preprocess: a no-op when the shards are committed). Then,
per variant and seed, without Ray Train (its per-run start-up would cost more than a whole training
here): build SlowFast from the config's model section plus the variant's fields, train `--steps` steps on
the train shards (iter_clips in train mode, with slowfast.train's optimizer and warm-up + cosine
schedule), and evaluate video-level top-1 over the chosen temporal views of the val shards
(VideoAggregator). Every variant of one seed starts from the same seed and sees the same clips in the
same order.

Measured choices, on the 2-core machine: train clips are decoded from the shards' JPEGs on the fly (at
48-pixel crops ~17 ms a batch of 16 against ~160 ms for the SlowFast step, ~10%, so keeping decoded
clips in memory would save little); the val views, which never change, are decoded once per process.
Trainings run two at a time in spawned processes of one thread each (--workers, --threads): one
SlowFast step costs 0.32 CPU-s on one thread and 0.41 CPU-s (0.21 s wall) on two, so two one-thread
trainings do ~30% more steps per second; and while other jobs load the machine, two-thread OpenMP
waits for its descheduled partner (Slow-only, Fast-only and SlowFast at 300 steps: ~660 CPU-s on two
threads, ~230 on one). Networks and clips are channels_last_3d (slowfast.train.memory_format): every
variant's step took 0.76-0.95x the time of the contiguous layout. Val top-1 is also measured twice during
training (--eval-every; 320 clips forward each) for the learning curves, which show whether the budget was enough.

Each (variant, seed) result is a JSON file under <out>/results/, named with a digest of everything that
decides the result (model fields, training settings, steps, seed, shard listing): a re-run skips what is
done and retrains only what changed. Each one is also an MLflow run in the config's experiment. Then the
Markdown table (<out>/ablation.md), the plot (<out>/ablation.png) and the paper's three qualitative
findings, checked with the numbers. <out> defaults to <storage_root>/ablate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import ValidationError

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run as a script or loaded by path: make `benchmarks`, `pipelines`, `slowfast` importable
    sys.path.insert(0, _ROOT)

from benchmarks._common import environment, format_table, publish_summary  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from pipelines.data import storage_of  # noqa: E402
from pipelines.storage import is_s3  # noqa: E402
from pipelines.train import TrainData, prepare_data  # noqa: E402
from pipelines.train_loop import fine_tuning  # noqa: E402
from slowfast.model import SlowFast, SlowFastConfig, count_params, save_checkpoint  # noqa: E402
from slowfast.model.flops import gflops  # noqa: E402
from slowfast.shards.reader import iter_clips  # noqa: E402
from slowfast.train import (
    LRSchedule,
    build_optimizer,
    memory_format,
    scaled_lr,
    topk_correct,  # noqa: E402
    train_step,
)
from slowfast.train.evaluation import score_views  # noqa: E402
from slowfast.video.sampling import choose_views  # noqa: E402

# name: (group, fields changed from the config's model section, what the paper calls it).
# The base, "slowfast", is the config's model as is (slowfast_tiny: time-strided conv lateral,
# concatenation, beta 1/8, rgb fast input); every other variant changes one thing.
BASE = "slowfast"
SLOW_ONLY, FAST_ONLY = "slow_only", "fast_only"
VARIANTS: dict[str, tuple[str, dict, str]] = {
    SLOW_ONLY: ("pathways", {"arch": "slow"}, "Slow-only"),
    FAST_ONLY: ("pathways", {"arch": "fast"}, "Fast-only"),
    BASE: ("pathways", {}, "SlowFast (T-conv, concat, beta 1/8, rgb)"),
    "time_to_channel": ("lateral", {"lateral": "time_to_channel"}, "lateral: time-to-channel"),
    "time_strided_sampling": ("lateral", {"lateral": "time_strided_sampling"}, "lateral: time-strided sampling"),
    "fusion_sum": ("fusion", {"fusion": "sum"}, "fusion: summation"),
    "beta_1_4": ("beta", {"beta": "1/4"}, "beta = 1/4"),
    "beta_1_16": ("beta", {"beta": "1/16"}, "beta = 1/16"),
    "grayscale": ("fast input", {"fast_input": "grayscale"}, "fast input: grayscale"),
    "time_difference": ("fast input", {"fast_input": "time_difference"}, "fast input: time difference"),
}
GROUP_COLOURS = {
    "pathways": "tab:blue",
    "lateral": "tab:orange",
    "fusion": "tab:green",
    "beta": "tab:purple",
    "fast input": "tab:red",
}
DEFAULT_STEPS, DEFAULT_SEEDS, DEFAULT_WARMUP = 300, 3, 0.1
FORMAT = memory_format("cpu")  # channels_last_3d: every variant's step 0.76-0.95x the time of contiguous
QUICK_STEPS = 8


# --- one training ---------------------------------------------------------------------------------------


def eval_batches(cfg: PipelineConfig, data: TrainData) -> list[dict]:
    """The val views as uint8 batches, decoded once for every variant: evaluate.temporal_views temporal
    views (chosen of those stored as everywhere else) x evaluate.spatial_crops crops per video."""
    store, ev = storage_of(cfg), cfg.evaluate
    return list(
        iter_clips(
            [(store.path(p), s) for p, s in data.val_shards],
            mode="eval",
            batch_size=cfg.train.batch_size,
            crop=cfg.train.crop_size,
            filesystem=store.fs,
            spatial_crops=ev.spatial_crops,
            views=choose_views(cfg.preprocess.eval_views, ev.temporal_views),
        )
    )


def score_val(net: SlowFast, batches: list[dict], num_classes: int, mixed_precision: bool = False) -> dict:
    """Video-level top-1 / top-5 through the one evaluation loop (softmax averaged over each video's views)."""
    res = score_views(net, batches, device="cpu", fmt=FORMAT, mixed_precision=mixed_precision).videos.results(
        num_classes
    )
    net.train()
    return {
        "top1": res["top1"],
        "top5": res["top5"],
        "mean_class_accuracy": res["mean_class_accuracy"],
        "val_videos": res["num_videos"],
    }


def train_variant(
    model_cfg: SlowFastConfig,
    cfg: PipelineConfig,
    data: TrainData,
    seed: int,
    steps: int,
    warmup: float,
    val: list[dict],
    eval_every: int = 0,
    init_state: dict | None = None,
    save_to: Path | None = None,
) -> dict:
    """Train one network for `steps` steps from seed `seed`, then evaluate it; returns the figures.
    With `eval_every`, the val top-1 is also measured every that many steps ("curve"); evaluating
    draws no random numbers and leaves batch norm's statistics alone, so the result is the same.
    Fine-tuning (benchmarks/bench_finetune.py): `init_state` replaces the seeded initial weights, and
    cfg.train's recipe (freeze_up_to, freeze_bn, head_lr_mult) applies as in the pipeline's train loop;
    `save_to`: the trained network is saved there (save_checkpoint, with the class names)."""
    t, store = cfg.train, storage_of(cfg)
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)  # initial weights and dropout
    net = SlowFast(model_cfg)
    if init_state is not None:  # loaded after the seeded build, so dropout draws the same numbers either way
        net.load_state_dict(init_state)
        fine_tuning(net, cfg)
    net = net.to(memory_format=FORMAT)
    lr = scaled_lr(t.base_lr, t.batch_size)
    steps_per_epoch = data.train_clips // t.batch_size
    total_epochs = steps / steps_per_epoch
    schedule = LRSchedule(base_lr=lr, warmup_epochs=warmup * total_epochs, total_epochs=total_epochs)
    optimizer = build_optimizer(
        net,
        lr=lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        nesterov=t.nesterov,
        head_lr_mult=t.head_lr_mult if init_state is not None else 1.0,
    )
    paths = [(store.path(p), s) for p, s in data.train_shards]
    losses, curve, correct, seen, step, epoch = [], [], 0, 0, 0, 0
    net.train()
    while step < steps:
        # The whole train set is one shuffle window (shards hold a class or two each, and batch norm
        # over a one-class batch learns little); the order and crops depend on (seed, epoch) only.
        for batch in iter_clips(
            paths,
            mode="train",
            batch_size=t.batch_size,
            crop=t.crop_size,
            jitter=t.scale_jitter,
            filesystem=store.fs,
            shuffle=True,
            shuffle_buffer=data.train_clips,
            seed=seed,
            epoch=epoch,
            drop_last=True,
        ):
            schedule.step(optimizer, 0, step, steps_per_epoch)
            out = train_step(
                net, optimizer, batch, fmt=FORMAT, mixed_precision=t.mixed_precision, grad_clip=t.grad_clip
            )
            losses.append(out.loss.item())
            if step >= steps - max(1, steps // 10):  # train accuracy over the last tenth of the budget
                correct += topk_correct(out.logits.detach(), batch["label"], (1,))[1]
                seen += len(batch["label"])
            step += 1
            if eval_every and step % eval_every == 0 and step < steps:
                curve.append([step, score_val(net, val, model_cfg.num_classes, cfg.train.mixed_precision)["top1"]])
            if step == steps:
                break
        epoch += 1
    train_s = time.perf_counter() - started
    if save_to is not None:
        save_checkpoint(net, save_to, class_names=data.classes)
    res = score_val(net, val, model_cfg.num_classes, cfg.train.mixed_precision)
    tail = losses[-max(1, steps // 10) :]
    return {
        **res,
        "train_loss": sum(tail) / len(tail),
        "train_top1": correct / max(seen, 1),
        "epochs": epoch,
        "curve": curve + [[steps, res["top1"]]],
        "train_s": round(train_s, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(time.process_time() - cpu_started, 2),
        "losses": losses,
    }


# --- the study ------------------------------------------------------------------------------------------


def result_key(
    cfg: PipelineConfig, data: TrainData, model_cfg: SlowFastConfig, seed: int, steps: int, warmup: float
) -> str:
    """A digest of everything that decides one result; a different digest is a different training."""
    t = cfg.train
    what = {
        "model": model_cfg.model_dump(mode="json"),
        "seed": seed,
        "steps": steps,
        "warmup": warmup,
        "train": t.model_dump(
            mode="json",
            include={
                "batch_size",
                "base_lr",
                "weight_decay",
                "momentum",
                "nesterov",
                "grad_clip",
                "crop_size",
                "scale_jitter",
            },
        ),
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "data": data.identity(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def variant_config(cfg: PipelineConfig, fields: dict, num_classes: int) -> SlowFastConfig:
    return cfg.model.to_slowfast_config(num_classes=num_classes, **fields)


class Job(NamedTuple):
    """One training: a variant, a seed, and where its result goes (named by the settings digest)."""

    name: str
    seed: int
    key: str
    path: Path
    model_cfg: SlowFastConfig


def plan_jobs(
    cfg: PipelineConfig,
    data: TrainData,
    variants: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    warmup: float,
    out: Path,
) -> list[Job]:
    """Every (variant, seed), seed by seed (a study cut short still compares variants on the same seeds),
    the costliest variant of each seed first (two workers then finish close together)."""
    jobs = []
    for seed in seeds:
        mine = []
        for name in variants:
            try:
                model_cfg = variant_config(cfg, VARIANTS[name][1], len(data.classes))
            except ValidationError as exc:  # the variant does not fit this model section
                why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ValueError(
                    f"variant {name} ({_change(VARIANTS[name][1])}) does not fit the config's model "
                    f"section: {why}; leave it out with --variants"
                ) from None
            key = result_key(cfg, data, model_cfg, seed, steps, warmup)
            mine.append(Job(name, seed, key, out / "results" / f"{name}-seed{seed}-{key}.json", model_cfg))
        jobs += sorted(mine, key=lambda j: -gflops(j.model_cfg, size=cfg.train.crop_size))
    return jobs


_VAL: dict[str, list[dict]] = {}  # per process: the decoded val views, by shard listing


def train_job(
    cfg_json: dict,
    data: TrainData,
    model_cfg: SlowFastConfig,
    seed: int,
    steps: int,
    warmup: float,
    threads: int,
    eval_every: int,
) -> dict:
    """One training, in this process or a worker's; the val views are decoded once per process."""
    torch.set_num_threads(threads)
    cfg = PipelineConfig.model_validate(cfg_json)
    if data.identity() not in _VAL:
        _VAL[data.identity()] = eval_batches(cfg, data)
    return train_variant(model_cfg, cfg, data, seed, steps, warmup, _VAL[data.identity()], eval_every)


def record(job: Job, figures: dict, cfg: PipelineConfig, args) -> dict:
    """Log a finished training to MLflow, then write its result file (whole or not at all, so a killed
    study retrains only what has no file)."""
    losses = figures.pop("losses")
    with torch.device("meta"):
        params = count_params(SlowFast(job.model_cfg))
    group, fields, _ = VARIANTS[job.name]
    result = {
        "variant": job.name,
        "group": group,
        "seed": job.seed,
        "key": job.key,
        "overrides": fields,
        "params": params,
        "gflops": round(gflops(job.model_cfg, size=cfg.train.crop_size), 4),
        "steps": args.steps,
        "batch_size": cfg.train.batch_size,
        "crop": cfg.train.crop_size,
        "threads": args.threads,
        "workers": args.workers,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **figures,
    }
    result["mlflow_run_id"] = log_mlflow(cfg, result, job.model_cfg, losses, args)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(job.path)
    return result


def run_jobs(jobs: Sequence[Job], cfg: PipelineConfig, data: TrainData, args) -> Iterator[tuple[Job, dict]]:
    """Train the jobs, `args.workers` at a time (spawned processes of `args.threads` threads each), and
    record each as it finishes; yields (job, result) in the order they finish."""
    cfg_json = cfg.model_dump(mode="json")
    call = [(cfg_json, data, j.model_cfg, j.seed, args.steps, args.warmup, args.threads, args.eval_every) for j in jobs]
    if args.workers == 1 or len(jobs) <= 1:
        for job, a in zip(jobs, call, strict=True):
            yield job, record(job, train_job(*a), cfg, args)
        return
    # Workers import this module by name. Loaded by path (as the CLI does), its folder must be on the
    # sys.path they start with.
    folder = str(Path(__file__).resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    ctx = multiprocessing.get_context("spawn")  # not fork: the parent has run Ray and OpenMP threads
    try:
        with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(train_job, *a): job for job, a in zip(jobs, call, strict=True)}
            for future in as_completed(futures):
                job = futures[future]
                yield job, record(job, future.result(), cfg, args)
    finally:
        if added:
            sys.path.remove(folder)


def log_mlflow(cfg: PipelineConfig, result: dict, model_cfg: SlowFastConfig, losses: list[float], args) -> str:
    """One MLflow run per (variant, seed, settings digest); an interrupted attempt's run is reused."""
    from mlflow.entities import Metric, Param, RunTag

    client = tracking.client(cfg)
    run_id = tracking.open_run(cfg, f"{result['variant']}-seed{result['seed']}-{result['key']}", log=log)
    logged = client.get_run(run_id).data.params
    params = {
        "variant": result["variant"],
        "seed": result["seed"],
        "preset": cfg.model.preset,
        **{f"model.{k}": v for k, v in result["overrides"].items()},
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": cfg.train.batch_size,
        "crop_size": cfg.train.crop_size,
        "lr": scaled_lr(cfg.train.base_lr, cfg.train.batch_size),
        "num_classes": model_cfg.num_classes,
    }
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(result[k]), now, 0)
        for k in (
            "top1",
            "top5",
            "mean_class_accuracy",
            "params",
            "gflops",
            "wall_s",
            "train_s",
            "train_loss",
            "train_top1",
        )
    ]
    metrics += [Metric("loss", v, now, i + 1) for i, v in enumerate(losses) if math.isfinite(v)]
    metrics += [Metric("val_top1", v, now, step) for step, v in result.get("curve", [])]
    tags = [
        RunTag("ablate.variant", result["variant"]),
        RunTag("ablate.group", result["group"]),
        RunTag("ablate.seed", str(result["seed"])),
        RunTag("ablate.key", result["key"]),
    ]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in logged], tags=tags)
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def summarize(results: Sequence[dict]) -> list[dict]:
    """Per variant, in VARIANTS order: top-1 mean and sample std over seeds, params, GFLOPs, wall time."""
    rows = []
    for name in VARIANTS:
        mine = sorted((r for r in results if r["variant"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        top1 = [r["top1"] for r in mine]
        rows.append(
            {
                "variant": name,
                "group": VARIANTS[name][0],
                "label": VARIANTS[name][2],
                "overrides": VARIANTS[name][1],
                "seeds": [r["seed"] for r in mine],
                "top1": top1,
                "top1_mean": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "params": mine[0]["params"],
                "gflops": mine[0]["gflops"],
                "wall_s": statistics.fmean(r["wall_s"] for r in mine),
                "train_loss": statistics.fmean(r["train_loss"] for r in mine),
                "train_top1": statistics.fmean(r["train_top1"] for r in mine),
                "curve": mean_curve(mine),
            }
        )
    return rows


def mean_curve(results: Sequence[dict]) -> list[list[float]]:
    """Val top-1 against steps, averaged over the seeds at the steps every seed measured."""
    curves = [dict(map(tuple, r.get("curve") or [])) for r in results]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return [[step, statistics.fmean(c[step] for c in curves)] for step in steps]


def findings(rows: Sequence[dict]) -> list[dict]:
    """The paper's qualitative findings, checked on the summary rows.

    A gap counts as beyond the seed-to-seed spread when it exceeds the two variants' standard
    deviations added (their mean +- std bars do not overlap); within the spread when it does not.
    """
    by = {r["variant"]: r for r in rows}

    def gap(a: str, b: str) -> tuple[float, float]:
        return by[a]["top1_mean"] - by[b]["top1_mean"], by[a]["top1_std"] + by[b]["top1_std"]

    out = []
    slowfast = [r["variant"] for r in rows if r["group"] != "pathways" or r["variant"] == BASE]
    if SLOW_ONLY in by and slowfast:
        parts, ok = [], True
        for v in slowfast:
            d, s = gap(v, SLOW_ONLY)
            ok &= d > s
            parts.append(f"{v} {d:+.3f} ({'>' if d > s else '<='} {s:.3f})")
        out.append(
            {
                "finding": "every SlowFast variant beats Slow-only by more than the seed-to-seed spread",
                "passed": ok,
                "detail": "top-1 minus Slow-only's (spread = std + std): " + "; ".join(parts),
            }
        )
    else:
        out.append(
            {
                "finding": "every SlowFast variant beats Slow-only by more than the seed-to-seed spread",
                "passed": None,
                "detail": "needs slow_only and at least one SlowFast variant",
            }
        )
    if BASE in by and FAST_ONLY in by:
        d, s = gap(BASE, FAST_ONLY)
        others = [v for v in slowfast if v != BASE and by[v]["top1_mean"] < by[FAST_ONLY]["top1_mean"]]
        out.append(
            {
                "finding": "SlowFast >= Fast-only",
                "passed": d >= 0,
                "detail": f"slowfast {by[BASE]['top1_mean']:.3f} vs fast_only {by[FAST_ONLY]['top1_mean']:.3f} "
                f"({d:+.3f}, spread {s:.3f}); SlowFast variants below Fast-only: "
                f"{', '.join(others) or 'none'}",
            }
        )
    else:
        out.append({"finding": "SlowFast >= Fast-only", "passed": None, "detail": "needs slowfast and fast_only"})
    if BASE in by and "grayscale" in by:
        d, s = gap("grayscale", BASE)
        out.append(
            {
                "finding": "grayscale fast input within the spread of rgb",
                "passed": abs(d) <= s,
                "detail": f"grayscale {by['grayscale']['top1_mean']:.3f} vs rgb (slowfast) "
                f"{by[BASE]['top1_mean']:.3f}: {d:+.3f}, spread {s:.3f}",
            }
        )
    else:
        out.append(
            {
                "finding": "grayscale fast input within the spread of rgb",
                "passed": None,
                "detail": "needs slowfast and grayscale",
            }
        )
    return out


def slow_only_ceiling(classes: Sequence[str]) -> float | None:
    """The best top-1 a Slow-only network can reach on the synthetic set: a class whose fast-only partner
    is also in the set is a coin flip (slowfast/video/synth.py); None for other datasets."""
    from slowfast.video.synth import CLASSES

    known = {c.label: c for c in CLASSES}
    if not classes or any(c not in known for c in classes):
        return None
    return statistics.fmean(0.5 if known[c].seen_by != "slow" and known[c].partner in classes else 1.0 for c in classes)


# --- output ---------------------------------------------------------------------------------------------


def _change(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(base)"


def table(rows: Sequence[dict], crop: int) -> str:
    headers = [
        "variant",
        "change",
        "top-1 (mean ± std)",
        "per seed",
        "train top-1",
        "params",
        f"GFLOPs ({crop}²)",
        "wall s / run",
    ]
    cells = [
        [
            r["variant"],
            _change(r["overrides"]),
            f"{r['top1_mean']:.3f} ± {r['top1_std']:.3f}",
            " ".join(f"{v:.3f}" for v in r["top1"]),
            f"{r['train_top1']:.3f}",
            f"{r['params']:,}",
            f"{r['gflops']:.3f}",
            f"{r['wall_s']:.0f}",
        ]
        for r in rows
    ]
    return format_table(headers, cells)


def findings_text(checks: Sequence[dict]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    return "\n".join(f"- **{mark[c['passed']]}** {c['finding']}: {c['detail']}" for c in checks)


def plot(rows: Sequence[dict], path: Path, title: str, ceiling: float | None, crop: int) -> Path:
    """Left: top-1 per variant (mean +- std, seeds as dots); middle: val top-1 against steps (mean over
    seeds); right: top-1 against GFLOPs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(18, 0.45 * len(rows) + 2.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax3, ax2 = fig.subplots(1, 3, width_ratios=(3, 2, 2))
    ys = list(range(len(rows)))[::-1]
    colours = [GROUP_COLOURS[r["group"]] for r in rows]
    ax.barh(
        ys, [r["top1_mean"] for r in rows], xerr=[r["top1_std"] for r in rows], color=colours, alpha=0.75, capsize=3
    )
    for y, r in zip(ys, rows, strict=True):
        ax.plot(r["top1"], [y] * len(r["top1"]), "k.", markersize=4)
        ax.text(r["top1_mean"] + r["top1_std"] + 0.01, y, f"{r['top1_mean']:.3f}", va="center", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=9)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("video top-1 (mean ± std over seeds; dots: seeds)")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Patch(color=c, alpha=0.75, label=g) for g, c in GROUP_COLOURS.items() if any(r["group"] == g for r in rows)
    ]
    if ceiling is not None:
        ax.axvline(ceiling, color="grey", linestyle="--", linewidth=1)
        handles.append(
            ax.plot([], [], color="grey", linestyle="--", linewidth=1, label=f"Slow-only ceiling {ceiling:.0%}")[0]
        )
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=10)
    styles, seen = ("-", "--", ":", "-."), {}
    for r, c in zip(rows, colours, strict=True):
        if not r["curve"]:
            continue
        nth = seen[r["group"]] = seen.get(r["group"], -1) + 1  # line style: which variant of its group
        style = styles[nth % len(styles)]
        steps, top1 = zip(*r["curve"], strict=True)
        ax3.plot(steps, top1, style, color=c, marker=".", label=r["variant"])
    if ceiling is not None:
        ax3.axhline(ceiling, color="grey", linestyle="--", linewidth=1)
    ax3.set_xlabel("optimizer step")
    ax3.set_ylabel("video top-1 (mean over seeds)")
    ax3.set_ylim(0, 1.02)
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7, ncol=2, loc="upper left")
    ax3.set_title("learning: val top-1 during training", fontsize=10)
    for r, c in zip(rows, colours, strict=True):
        ax2.errorbar(r["gflops"], r["top1_mean"], yerr=r["top1_std"], fmt="o", color=c, capsize=3)
        ax2.annotate(r["variant"], (r["gflops"], r["top1_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax2.set_xlabel(f"GFLOPs per {crop}x{crop} clip")
    ax2.set_ylabel("video top-1")
    ax2.grid(alpha=0.3)
    ax2.set_title("accuracy against cost", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench ablate", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/ablate.yaml", help="pipeline YAML (default configs/ablate.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, as for the other commands (repeatable)",
    )
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per variant: train.seed, train.seed + 1, ... (default {DEFAULT_SEEDS}, quick 1)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per training, the same for every variant (default {DEFAULT_STEPS}, quick {QUICK_STEPS})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=DEFAULT_WARMUP,
        help=f"share of the steps spent in linear LR warm-up (default {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="also measure val top-1 every STEPS steps, for the learning curves (default: a third "
        "of --steps; 0: only at the end)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="trainings at once, each in its own process (default: 2, or 1 on one core)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per training (default: cores / workers, at least 1)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results, table and plot (default <storage_root>/ablate)"
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_STEPS} steps, 1 seed")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else DEFAULT_SEEDS
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    args.eval_every = args.steps // 3 if args.eval_every is None else args.eval_every
    cores = os.cpu_count() or 1
    if args.workers is None:
        args.workers = min(2, cores)
    if args.threads is None:
        args.threads = max(1, cores // max(args.workers, 1))
    if min(args.seeds, args.steps, args.workers, args.threads) < 1 or not 0 <= args.warmup < 1 or args.eval_every < 0:
        parser.error(
            "--seeds, --steps, --workers and --threads must be at least 1, --warmup in [0, 1), --eval-every at least 0"
        )
    names = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
    args.variants = [v for v in VARIANTS if v in names]
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"bench ablate: {exc}", file=sys.stderr)
        return 2
    if args.out is None and is_s3(cfg.storage_root):
        print("bench ablate: storage_root is on S3; pass --out DIR for the results, table and plot", file=sys.stderr)
        return 2
    out = args.out or Path(cfg.storage_root) / "ablate"
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    import ray

    ray_before = ray.is_initialized()
    data = prepare_data(cfg, storage_of(cfg), log=log)
    if ray.is_initialized() and not ray_before:
        ray.shutdown()  # preprocessing is done; its workers would only take memory and CPU from training
    prepared_s = time.perf_counter() - started

    seeds = [cfg.train.seed + i for i in range(args.seeds)]
    try:
        jobs = plan_jobs(cfg, data, args.variants, seeds, args.steps, args.warmup, out)
    except ValueError as exc:
        print(f"bench ablate: {exc}", file=sys.stderr)
        return 2
    done = {j.path: json.loads(j.path.read_text()) for j in jobs if j.path.is_file()}
    todo = [j for j in jobs if j.path not in done]
    log(
        f"bench ablate: {len(args.variants)} variants x {len(seeds)} seeds, {args.steps} steps of "
        f"{cfg.train.batch_size} clips ({args.steps * cfg.train.batch_size / data.train_clips:.1f} epochs of "
        f"{data.train_clips} train clips), crop {cfg.train.crop_size}, {len(data.classes)} classes, val "
        f"{data.val_videos} videos; {len(done)} trainings done before, {len(todo)} to run, {args.workers} at a "
        f"time x {args.threads} thread(s); results -> {out / 'results'}"
    )
    for i, (job, result) in enumerate(run_jobs(todo, cfg, data, args), 1):
        done[job.path] = result
        log(
            f"[{i}/{len(todo)}] {job.name} seed {job.seed}: top-1 {result['top1']:.3f}, train loss "
            f"{result['train_loss']:.3f}, {result['wall_s']:.0f}s ({time.perf_counter() - started:.0f}s so far)"
        )
    results = [done[j.path] for j in jobs]
    trained = len(todo)

    rows = summarize(results)
    checks = findings(rows)
    ceiling = slow_only_ceiling(data.classes)
    wall = time.perf_counter() - started
    load = os.getloadavg()
    cpu = sum(r["cpu_s"] for r in results)
    title = (
        f"{cfg.model.preset} variants on the synthetic motion set ({len(data.classes)} classes, "
        f"{data.val_videos} val videos): {args.steps} steps x {cfg.train.batch_size} clips, "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    )
    md = "\n".join(
        [
            f"{title}\n",
            table(rows, cfg.train.crop_size),
            "",
            f"Video top-1 over {cfg.evaluate.temporal_views} temporal view(s) x {cfg.evaluate.spatial_crops} crop(s); "
            f"std over seeds (sample std); GFLOPs of one {cfg.train.crop_size}x{cfg.train.crop_size} clip; wall "
            "time per training (train + eval) on this machine."
            + (f" Slow-only can reach at most {ceiling:.1%} on these classes." if ceiling is not None else ""),
            "",
            "Findings (a gap is beyond the spread when it exceeds the two stds added):",
            findings_text(checks),
            "",
            f"This run: {trained} trained now, {len(jobs) - trained} done before; {wall:.0f}s wall "
            f"(data {prepared_s:.0f}s), {args.workers} trainings at a time x {args.threads} thread(s), "
            f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min). "
            f"The {len(jobs)} trainings took {cpu:.0f} CPU-s: {cpu / args.workers / 60:.1f} min on {args.workers} "
            "free cores.",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md + "\n")
    plot(rows, out / "ablation.png", title, ceiling, cfg.train.crop_size)
    summary = {
        "benchmark": "ablate",
        "environment": environment("cpu"),
        "config": str(args.config),
        "steps": args.steps,
        "seeds": seeds,
        "warmup": args.warmup,
        "eval_every": args.eval_every,
        "workers": args.workers,
        "threads": args.threads,
        "variants": rows,
        "findings": checks,
        "slow_only_ceiling": ceiling,
        "trained_now": trained,
        "skipped": len(jobs) - trained,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "prepare_s": round(prepared_s, 1),
        "load_average": [round(x, 2) for x in load],
    }
    publish_summary(
        summary,
        md,
        out / "summary.json",
        f"table {out / 'ablation.md'}, plot {out / 'ablation.png'}, "
        f"MLflow experiment {cfg.mlflow.experiment!r} at {tracking.tracking_uri(cfg)}",
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
