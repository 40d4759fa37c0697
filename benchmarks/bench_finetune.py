"""Fine-tuning benchmark: pre-train on some synthetic motion classes, publish the weights in the four foreign
checkpoint formats, then fine-tune on other classes (a folder-format dataset) against training from scratch.

    python -m pipelines bench finetune                      # the whole study (defaults below), ~14 min on 2 cores
    python -m pipelines bench finetune --seeds 1 --steps 90 # shorter
    python -m pipelines bench finetune --quick --out /tmp/ft   # smoke test: tiny set, a few steps

What it does, in order, everything under --out (default ./storage/bench-finetune):

1. Data. The synthetic set (pipelines.data.synthesize: --classes motion classes x --videos-per-class videos,
   84x64, 2 s) is split by class: the first --pretrain-classes (default 6: scrolling up, the stripes pair,
   bouncing, the flicker pair) stand in for Kinetics, the rest (5: standing still, scrolling down, the
   wobble/jitter pair, pulsing) for "your videos". Each half is laid out as a folder-format dataset
   (data.format: folder, <split>/<label>/<video>, hard links to the synthetic files) and preprocessed into
   shards by the pipeline's own ingest and preprocess (pipelines.train.prepare_data, a local Ray).
2. Pre-training: slowfast_tiny (time-difference fast input and base LR 0.1 as in configs/demo.yaml, crop 48 as
   in configs/ablate.yaml) for --pretrain-steps steps on the first half, through bench_ablate.train_variant (the
   ablation's loop: iter_clips, train_step, warm-up + cosine, score_views).
3. Publishing: the pre-trained network is written with slowfast.model.export_checkpoint in each foreign format
   (PySlowFast .pyth, PySlowFast Caffe2 .pkl, pytorchvideo .pyth, mmaction2 .pth); each file is loaded back
   into a fresh network (load_checkpoint, head "strict") and compared tensor by tensor with the original.
4. Fine-tuning against scratch, per seed: "scratch" builds the network from the seed; each "fine-tune"
   arm starts from one format's file, loaded by the pipeline's own driver code (pipelines.train.initial_weights
   with train.init_from = the file: backbone checked and loaded, head re-initialised for the new classes),
   then applies the recipe of the train section (freeze_up_to, freeze_bn, head_lr_mult; by default those of
   configs/finetune.yaml: nothing frozen, head LR x5) as the pipeline's train loop does.
   Everything else is the same for both: steps, batch, LR schedule (base LR, warm-up, cosine),
   the clips and their order, the dropout draws (the network is built from the seed in both, then loaded), the
   head's initial weights. Val top-1 (video level, 4 temporal views, centre crop) is measured every
   --eval-every steps: the learning curve gives the steps each arm needs to reach --target top-1.
   The first of --formats (caffe2, the model zoo's format) is fine-tuned on every seed, the others on the first
   seed (--every-format-every-seed: all). A digest of the weights each fine-tune starts from (every tensor but
   the BN step counters, which the
   Caffe2 format does not carry and nothing reads) shows that the four formats hand over the same network, and
   a digest of each run's loss sequence whether their trainings then ran identically.

Trainings run --workers at a time in spawned processes of --threads threads (bench_ablate's measurement: two
one-thread trainings do ~30% more steps per second than one two-thread one on 2 cores); scratch runs do not
wait for the pre-training. Each result is a JSON file under <out>/results/ named by a digest of everything
that decides it (a re-run trains only what is missing or changed); the pre-trained checkpoint and its exports
live under <out>/pretrain/<digest>/. Then the table (<out>/finetune.md), the plot (<out>/finetune.png) and
<out>/summary.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run as a script or loaded by path: make `benchmarks`, `pipelines`, `slowfast` importable
    sys.path.insert(0, _ROOT)

from benchmarks._common import environment, format_table, publish_summary, ratio  # noqa: E402
from benchmarks.bench_ablate import eval_batches, mean_curve, train_variant  # noqa: E402
from pipelines.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from pipelines.data import storage_of, synthesize  # noqa: E402
from pipelines.train import TrainData, initial_weights, prepare_data  # noqa: E402
from slowfast.model import SlowFast, SlowFastConfig, export_checkpoint, load_checkpoint  # noqa: E402
from slowfast.model.checkpoint import HEAD_KEYS  # noqa: E402
from slowfast.model.formats import NBT  # noqa: E402
from slowfast.video.synth import class_names  # noqa: E402

# Foreign formats, as the files their own tools write: name -> file name. Caffe2 first: the format of the
# model-zoo file configs/finetune.yaml starts from, the headline arm fine-tuned on every seed.
FORMATS = {
    "caffe2": "SLOWFAST_TINY.pkl",
    "pyslowfast": "SLOWFAST_TINY.pyth",
    "pytorchvideo": "slowfast_tiny_pytorchvideo.pyth",
    "mmaction2": "slowfast_tiny_mmaction2.pth",
}
SCRATCH, PRETRAIN = "scratch", "pretrain"
SIZE, SECONDS = 64, 2.0  # the ablation's synthetic videos: 84x64, 2 s
DEFAULTS = {
    "classes": 11,
    "pretrain_classes": 6,
    "videos_per_class": 32,
    "pretrain_steps": 400,
    "steps": 150,
    "seeds": 3,
    "eval_every": 10,
    "target": 0.7,
    "warmup": 0.1,
}
QUICK = {
    "classes": 5,
    "pretrain_classes": 3,
    "videos_per_class": 4,
    "pretrain_steps": 4,
    "steps": 4,
    "seeds": 1,
    "eval_every": 2,
}

# What both halves share: the ablation's data and crop (configs/ablate.yaml), the demo's model and LR
# (configs/demo.yaml: time-difference fast input, base LR 0.1; with rgb input and the ablation's 0.04, a
# 400-step pre-training reached 0.44 on its 6 classes and scratch 0.28 on the other 5: nothing to transfer),
# and the fine-tuning recipe of configs/finetune.yaml, which applies to the fine-tune arms only: every layer
# trained, batch norm learning, the new head at 5x the backbone's LR.
BASE = {
    "preprocess": {
        "target_fps": 30,
        "short_side": 56,
        "clips_per_video": 4,
        "eval_views": 4,
        "frame_format": "jpeg",
        "jpeg_quality": 90,
        "rows_per_shard": 128,
        "seed": 0,
    },
    "model": {"preset": "slowfast_tiny", "fast_input": "time_difference"},
    "train": {
        "batch_size": 16,
        "base_lr": 0.1,
        "crop_size": 48,
        "scale_jitter": [56, 68],
        "seed": 0,
        "freeze_up_to": "none",
        "freeze_bn": False,
        "head_lr_mult": 5.0,
    },
    "evaluate": {"temporal_views": 4, "spatial_crops": 1},
    "ray": {"address": None, "data_cpus": 1},
}
RECIPE_KEYS = ("freeze_up_to", "freeze_bn", "head_lr_mult")
TRAIN_KEYS = {
    "batch_size",
    "base_lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "grad_clip",
    "crop_size",
    "scale_jitter",
    "mixed_precision",
}


# --- data -----------------------------------------------------------------------------------------------


def synthetic_set(out: Path, classes: int, videos_per_class: int, log) -> Path:
    """The synthetic videos (<split>/<label>/<video>), generated once per (classes, videos per class)."""
    root = out / f"synth-{classes}x{videos_per_class}"
    if not (root / "annotations" / "val.csv").is_file():  # synthesize writes the CSVs last
        synthesize(str(root), classes, videos_per_class, seed=0, size=SIZE, seconds=SECONDS, log=log)
    return root


def class_folder(synth: Path, labels: Sequence[str], dest: Path) -> Path:
    """`labels`' videos of the synthetic set as a folder-format dataset <split>/<label>/<video> (hard links)."""
    for label in labels:
        for split in ("train", "val"):
            for video in sorted((synth / split / label).glob("*.mp4")):
                target = dest / split / label / video.name
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(video, target)
                except OSError:  # another filesystem
                    shutil.copy2(video, target)
    return dest


def half_config(out: Path, half: str, videos: Path, overrides: Sequence[str]) -> PipelineConfig:
    """One half's pipeline config, written to <out>/<half>.yaml and loaded as the CLI loads one (--set applies)."""
    raw = {
        "name": f"bench-finetune-{half}",
        "storage_root": str(out),
        "data": {"dataset": f"synth_{half}", "format": "folder", "video_root": str(videos), "annotations": {}},
        **BASE,
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
    }
    path = out / f"{half}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path, list(overrides))


# --- one training ---------------------------------------------------------------------------------------


@dataclass
class Job:
    """One training: an arm (pretrain, scratch or a format's fine-tune), a seed, where its result goes."""

    arm: str
    seed: int
    key: str
    path: Path
    cfg_json: dict  # the half's config; train.seed is the seed, train.init_from the checkpoint a fine-tune loads
    data: TrainData
    model_cfg: SlowFastConfig
    steps: int
    eval_every: int
    warmup: float
    threads: int
    save_to: Path | None = None  # the pre-training's checkpoint
    format: str | None = None  # the fine-tune's checkpoint format


def state_digest(state: dict, skip: Callable[[str], bool] = lambda key: False) -> str:
    """sha256 over every tensor's name and bytes (not the BN step counters), in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key.endswith(NBT) or skip(key):
            continue
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_digest(state: dict) -> str:
    return state_digest(state, skip=lambda key: key in HEAD_KEYS)


_VAL: dict[str, list[dict]] = {}  # per process: the decoded val views, by shard listing


def run_job(job: Job) -> dict:
    """One training, in this process or a worker's; a fine-tune first loads its checkpoint as the pipeline's
    driver does (train.init_from), which also re-initialises the head from train.seed."""
    torch.set_num_threads(job.threads)
    cfg = PipelineConfig.model_validate(job.cfg_json)
    if job.data.identity() not in _VAL:
        _VAL[job.data.identity()] = eval_batches(cfg, job.data)
    init, lines = None, []
    if job.format is not None:
        init = initial_weights(cfg, job.data, storage_of(cfg), log=lines.append)
        reinitialised = init["tags"]["slowfast.init_reinitialised"]
        if reinitialised != ", ".join(HEAD_KEYS):
            raise RuntimeError(
                f"{cfg.train.init_from}: the head was not re-initialised ({reinitialised}): a foreign "
                "checkpoint names no classes, so with as many pre-training as fine-tuning classes "
                "its head is kept; choose --pretrain-classes so that the two counts differ"
            )
    figures = train_variant(
        job.model_cfg,
        cfg,
        job.data,
        job.seed,
        job.steps,
        job.warmup,
        _VAL[job.data.identity()],
        job.eval_every,
        init_state=init["state"] if init else None,
        save_to=job.save_to,
    )
    losses = figures.pop("losses")
    figures["losses_digest"] = hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:16]
    if init is not None:
        figures.update(
            init_digest=state_digest(init["state"]),
            init_backbone_digest=backbone_digest(init["state"]),
            init_log=lines[-1] if lines else "",
            init_tags={k.removeprefix("slowfast."): v for k, v in init["tags"].items()},
        )
    return figures


def job_key(job_fields: dict) -> str:
    return hashlib.sha256(json.dumps(job_fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan(
    args, pre_cfg: PipelineConfig, ft_cfg: PipelineConfig, pre: TrainData, ft: TrainData, out: Path
) -> tuple[Job, list[Job], list[Job]]:
    """The pre-training, the scratch runs and the fine-tunes: seed by seed, the first of --formats on every seed,
    the others on the first seed only (on every seed with --every-format-every-seed)."""

    def what(
        cfg: PipelineConfig, data: TrainData, model_cfg: SlowFastConfig, seed: int, steps: int, recipe: bool
    ) -> dict:
        keys = TRAIN_KEYS | (set(RECIPE_KEYS) if recipe else set())
        return {
            "model": model_cfg.model_dump(mode="json"),
            "seed": seed,
            "steps": steps,
            "warmup": args.warmup,
            "train": cfg.train.model_dump(mode="json", include=keys),
            "data": data.identity(),
            "evaluate": cfg.evaluate.model_dump(mode="json"),
        }

    pre_model = pre_cfg.model.to_slowfast_config(num_classes=len(pre.classes))
    pre_seed = pre_cfg.train.seed
    pre_key = job_key(what(pre_cfg, pre, pre_model, pre_seed, args.pretrain_steps, False))
    folder = out / "pretrain" / pre_key
    pretrain = Job(
        PRETRAIN,
        pre_seed,
        pre_key,
        folder / "result.json",
        pre_cfg.model_dump(mode="json"),
        pre,
        pre_model,
        args.pretrain_steps,
        max(args.eval_every, args.pretrain_steps // 8),
        args.warmup,
        args.threads,
        save_to=folder / "pretrained.pt",
    )
    ft_model = ft_cfg.model.to_slowfast_config(num_classes=len(ft.classes))
    scratch, finetune = [], []
    for i, seed in enumerate(range(ft_cfg.train.seed, ft_cfg.train.seed + args.seeds)):
        fields = what(ft_cfg, ft, ft_model, seed, args.steps, False) | {"eval_every": args.eval_every}
        key = job_key(fields)
        cfg_json = ft_cfg.model_dump(mode="json")
        cfg_json["train"]["seed"] = seed
        scratch.append(
            Job(
                SCRATCH,
                seed,
                key,
                out / "results" / f"{SCRATCH}-seed{seed}-{key}.json",
                cfg_json,
                ft,
                ft_model,
                args.steps,
                args.eval_every,
                args.warmup,
                args.threads,
            )
        )
        for fmt in args.formats if i == 0 or args.every_format_every_seed else args.formats[:1]:
            key = job_key(
                what(ft_cfg, ft, ft_model, seed, args.steps, True)
                | {"eval_every": args.eval_every, "pretrained": pre_key, "format": fmt}
            )
            tuned = json.loads(json.dumps(cfg_json))
            tuned["train"]["init_from"] = str(folder / FORMATS[fmt])
            finetune.append(
                Job(
                    f"finetune-{fmt}",
                    seed,
                    key,
                    out / "results" / f"finetune-{fmt}-seed{seed}-{key}.json",
                    tuned,
                    ft,
                    ft_model,
                    args.steps,
                    args.eval_every,
                    args.warmup,
                    args.threads,
                    format=fmt,
                )
            )
    return pretrain, scratch, finetune


def publish(pretrain: Job, formats: Sequence[str]) -> list[dict]:
    """Write the pre-trained network in each format beside its checkpoint, load each back into a fresh network
    and compare every tensor (the BN step counters aside: the Caffe2 format has none)."""
    torch.manual_seed(0)
    net = SlowFast(pretrain.model_cfg)
    load_checkpoint(net, pretrain.save_to)
    want = net.state_dict()
    rows = []
    for fmt in formats:
        path = export_checkpoint(net, pretrain.save_to.parent / FORMATS[fmt], fmt)
        back = SlowFast(pretrain.model_cfg)
        report = load_checkpoint(back, path)
        got = back.state_dict()
        differ = [k for k in want if not k.endswith(NBT) and not torch.equal(want[k], got[k])]
        rows.append(
            {
                "format": fmt,
                "file": path.name,
                "path": str(path),
                "bytes": path.stat().st_size,
                "detected": report.format,
                "tensors": report.loaded,
                "equal": not differ,
                "differ": differ[:5],
                "backbone_digest": backbone_digest(want),
            }
        )
    return rows


class _InProcess:
    """A one-worker pool that runs each job when it is submitted (no spawn, no pickling)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # handed to the caller through the future, as a process pool would
            future.set_exception(exc)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_all(pretrain: Job, scratch: Sequence[Job], finetune: Sequence[Job], args, log) -> tuple[dict, list[dict], int]:
    """Train what has no result yet, `args.workers` at a time: the pre-training and the scratch runs first (they
    do not depend on each other), the fine-tunes once the pre-trained weights are published. Returns every
    result by job path, the format checks and how many trainings ran now."""
    done = {j.path: json.loads(j.path.read_text()) for j in (pretrain, *scratch, *finetune) if j.path.is_file()}
    todo = [j for j in (pretrain, *scratch, *finetune) if j.path not in done]
    log(
        f"bench finetune: {len(done)} trainings done before, {len(todo)} to run, {args.workers} at a time x "
        f"{args.threads} thread(s); results -> {scratch[0].path.parent}"
    )
    if args.workers == 1:
        pool = _InProcess()
    else:
        # Workers import this module by name. Loaded by path (as the CLI does), its folder must be on the
        # sys.path they start with.
        folder = str(Path(__file__).resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
        pool = ProcessPoolExecutor(
            max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")
        )  # not fork: Ray ran here
    checks: list[dict] = []

    def publish_checked() -> list[Job]:
        checks.extend(publish(pretrain, args.formats))
        bad = [c for c in checks if not c["equal"]]
        if bad:
            raise RuntimeError(
                "the pre-trained weights do not load back equal from "
                + "; ".join(f"{c['format']} ({', '.join(c['differ'])})" for c in bad)
            )
        return [j for j in finetune if j.path not in done]

    queue = [j for j in (pretrain, *scratch) if j.path not in done]
    if pretrain.path in done:
        queue += publish_checked()
    started, count = time.perf_counter(), 0
    with pool:
        pending: dict[Future, Job] = {}
        while queue or pending:
            while queue and len(pending) < args.workers:
                job = queue.pop(0)
                pending[pool.submit(run_job, job)] = job
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                result = done[job.path] = record(job, future.result())
                count += 1
                log(
                    f"[{count}/{len(todo)}] {job.arm} seed {job.seed}: top-1 {result['top1']:.3f}, train loss "
                    f"{result['train_loss']:.3f}, {result['wall_s']:.0f}s ({time.perf_counter() - started:.0f}s so far)"
                )
                if job is pretrain:
                    queue += publish_checked()
    return done, checks, count


def record(job: Job, figures: dict) -> dict:
    """Write a finished training's result file, whole or not at all (a killed study retrains only what has none)."""
    result = {
        "arm": job.arm,
        "format": job.format,
        "seed": job.seed,
        "key": job.key,
        "steps": job.steps,
        "eval_every": job.eval_every,
        "threads": job.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **figures,
    }
    job.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(job.path)
    return result


# --- the figures ----------------------------------------------------------------------------------------


def steps_to(curve: Sequence[Sequence[float]], target: float) -> int | None:
    """The first measured step at which val top-1 reached `target`; None: not within the budget."""
    return next((int(step) for step, top1 in curve if top1 >= target), None)


def summarize(results: Sequence[dict], arms: Sequence[str], target: float) -> list[dict]:
    """Per arm: top-1 after the budget (mean, sample std, per seed), steps to the target per seed, mean curve."""
    rows = []
    for arm in arms:
        mine = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        top1 = [r["top1"] for r in mine]
        rows.append(
            {
                "arm": arm,
                "format": mine[0]["format"],
                "seeds": [r["seed"] for r in mine],
                "top1": top1,
                "top1_mean": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "steps_to_target": [steps_to(r["curve"], target) for r in mine],
                "train_loss": statistics.fmean(r["train_loss"] for r in mine),
                "wall_s": statistics.fmean(r["wall_s"] for r in mine),
                "curve": mean_curve(mine),
                "curves": [r["curve"] for r in mine],
            }
        )
    return rows


def speedups(row: dict, scratch: dict, budget: int) -> list[str]:
    """Per seed of `row`: scratch's steps to the target (same seed) over this arm's; '>' a lower bound when
    scratch never got there, '-' when this arm did not."""
    theirs_by_seed = dict(zip(scratch["seeds"], scratch["steps_to_target"], strict=True))
    out = []
    for seed, mine in zip(row["seeds"], row["steps_to_target"], strict=True):
        theirs = theirs_by_seed.get(seed)
        if mine is None:
            out.append("-")
        elif theirs is None:
            out.append(f">{budget / mine:.1f}x")
        else:
            out.append(f"{theirs / mine:.1f}x")
    return out


def scratch_mean(row: dict, scratch: dict) -> float:
    """Scratch's mean top-1 over the seeds `row` has (an arm run on the first seed only is compared with that)."""
    by_seed = dict(zip(scratch["seeds"], scratch["top1"], strict=True))
    return statistics.fmean(by_seed[s] for s in row["seeds"])


def _steps(values: Sequence[int | None], budget: int) -> str:
    return " ".join(str(v) if v is not None else f">{budget}" for v in values)


def main_table(rows: Sequence[dict], budget: int, target: float) -> str:
    scratch = next(r for r in rows if r["arm"] == SCRATCH)
    headers = [
        "arm",
        f"top-1 at {budget} steps (mean ± std)",
        "per seed",
        "/ scratch (same seeds)",
        f"steps to top-1 ≥ {target:g}, per seed",
        "scratch steps / these",
        "train loss",
    ]
    cells = [
        [
            r["arm"],
            f"{r['top1_mean']:.3f} ± {r['top1_std']:.3f}",
            " ".join(f"{v:.3f}" for v in r["top1"]),
            f"{ratio(r['top1_mean'], scratch_mean(r, scratch), 2)}x",
            _steps(r["steps_to_target"], budget),
            " ".join(speedups(r, scratch, budget)) if r is not scratch else "1.0x",
            f"{r['train_loss']:.3f}",
        ]
        for r in rows
    ]
    return format_table(headers, cells)


def format_table_md(checks: Sequence[dict], results: Sequence[dict], seeds: Sequence[int]) -> str:
    """Per format: the file, what loaded back, and per seed the digest of the weights its fine-tune started
    from and of the run's losses."""
    headers = ["format", "file", "MB", "read as", "tensors", "loads back equal"] + [
        f"seed {s}: start weights / losses" for s in seeds
    ]
    cells = []
    for c in checks:
        runs = {r["seed"]: r for r in results if r["format"] == c["format"]}
        cells.append(
            [
                c["format"],
                c["file"],
                f"{c['bytes'] / 1e6:.1f}",
                c["detected"],
                c["tensors"],
                "yes" if c["equal"] else f"NO: {', '.join(c['differ'])}",
            ]
            + [f"{runs[s]['init_digest'][:8]} / {runs[s]['losses_digest'][:8]}" if s in runs else "-" for s in seeds]
        )
    return format_table(headers, cells)


def findings(
    rows: Sequence[dict], checks: Sequence[dict], results: Sequence[dict], pretrained: str, target: float, budget: int
) -> list[dict]:
    """What the numbers say, checked: a gap counts when it exceeds the two arms' stds added."""
    out = []
    scratch = next(r for r in rows if r["arm"] == SCRATCH)
    tuned = [r for r in rows if r["arm"] != SCRATCH]
    if tuned:
        first = tuned[0]
        gap, spread = first["top1_mean"] - scratch["top1_mean"], first["top1_std"] + scratch["top1_std"]
        out.append(
            {
                "finding": f"fine-tuning beats scratch at {budget} steps by more than the seed spread",
                "passed": gap > spread,
                "detail": f"{first['arm']} {first['top1_mean']:.3f} vs scratch {scratch['top1_mean']:.3f} "
                f"({gap:+.3f}, spread {spread:.3f})",
            }
        )
        reached = [s for s in first["steps_to_target"] if s is not None]
        theirs = [s for s in scratch["steps_to_target"] if s is not None]
        out.append(
            {
                "finding": f"fine-tuning reaches top-1 {target:g} in fewer steps than scratch, every seed",
                "passed": all(
                    m is not None and (t is None or m < t)
                    for m, t in zip(first["steps_to_target"], scratch["steps_to_target"], strict=True)
                ),
                "detail": f"{first['arm']}: {_steps(first['steps_to_target'], budget)} "
                f"({len(reached)}/{len(first['seeds'])} seeds reached it); scratch: "
                f"{_steps(scratch['steps_to_target'], budget)} ({len(theirs)}/{len(scratch['seeds'])})",
            }
        )
    fine = [r for r in results if r["format"]]
    by_seed: dict[int, list[dict]] = {}
    for r in fine:
        by_seed.setdefault(r["seed"], []).append(r)
    same_start = all(len({r["init_digest"] for r in rs}) == 1 for rs in by_seed.values())
    backbone = all(r["init_backbone_digest"] == pretrained for r in fine)
    out.append(
        {
            "finding": "every format hands over the same weights (loads back equal; same start per seed; "
            "backbone = the pre-trained one)",
            "passed": bool(fine) and all(c["equal"] for c in checks) and same_start and backbone,
            "detail": f"{len(checks)} formats loaded back equal: {sum(c['equal'] for c in checks)}; seeds with one "
            f"start digest across formats: {sum(len({r['init_digest'] for r in rs}) == 1 for rs in by_seed.values())}"
            f"/{len(by_seed)}; fine-tunes whose backbone digest is the pre-trained one: "
            f"{sum(r['init_backbone_digest'] == pretrained for r in fine)}/{len(fine)}",
        }
    )
    multi = {s: rs for s, rs in by_seed.items() if len(rs) > 1}
    identical = [
        s for s, rs in multi.items() if len({(r["losses_digest"], r["top1"], json.dumps(r["curve"])) for r in rs}) == 1
    ]
    out.append(
        {
            "finding": "fine-tunes from the different formats train identically (same losses, curve, top-1)",
            "passed": len(identical) == len(multi) if multi else None,
            "detail": f"seeds fine-tuned from more than one format: {len(multi)}, identical in every step: "
            f"{len(identical)}"
            if multi
            else "needs two or more formats",
        }
    )
    return out


def findings_text(checks: Sequence[dict]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    return "\n".join(f"- **{mark[c['passed']]}** {c['finding']}: {c['detail']}" for c in checks)


def plot(rows: Sequence[dict], path: Path, title: str, target: float, budget: int) -> Path:
    """Left: val top-1 against steps for scratch and the headline fine-tune (thin: seeds; thick: mean); the
    other formats' curves only where they differ from the headline's on the same seed. Right: top-1 after the
    budget per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, bars = fig.subplots(1, 2, width_ratios=(3, 2))
    colours = dict(
        zip([r["arm"] for r in rows], ["tab:grey", "tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False)
    )
    headline = rows[1] if len(rows) > 1 else None
    same = []
    for r in rows:
        if r in rows[:2]:
            for curve in r["curves"]:
                ax.plot(*zip(*curve, strict=True), color=colours[r["arm"]], alpha=0.3, linewidth=0.8)
            ax.plot(
                *zip(*r["curve"], strict=True),
                color=colours[r["arm"]],
                linewidth=2,
                marker=".",
                label=f"{r['arm']} (mean of {len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})",
            )
            continue
        theirs = dict(zip(headline["seeds"], headline["curves"], strict=True))
        for seed, curve in zip(r["seeds"], r["curves"], strict=True):
            if curve == theirs.get(seed):
                same.append(f"{r['format']} seed {seed}")
            else:
                ax.plot(
                    *zip(*curve, strict=True),
                    "--",
                    color=colours[r["arm"]],
                    linewidth=1.2,
                    label=f"{r['arm']} seed {seed}",
                )
    ax.axhline(target, color="black", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel(
        "optimizer step"
        + (f"\n{', '.join(same)}: the same curve as {headline['format']}'s on that seed" if same else "")
    )
    ax.set_ylabel("val video top-1")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, budget)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    ys = list(range(len(rows)))[::-1]
    bars.barh(
        ys,
        [r["top1_mean"] for r in rows],
        xerr=[r["top1_std"] for r in rows],
        color=[colours[r["arm"]] for r in rows],
        alpha=0.75,
        capsize=3,
    )
    for y, r in zip(ys, rows, strict=True):
        bars.plot(r["top1"], [y] * len(r["top1"]), "k.", markersize=4)
        bars.text(r["top1_mean"] + r["top1_std"] + 0.015, y, f"{r['top1_mean']:.3f}", va="center", fontsize=8)
    bars.set_yticks(
        ys, [f"{r['arm']} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})" for r in rows], fontsize=9
    )
    bars.set_xlim(0, 1.08)
    bars.set_xlabel(f"val video top-1 after {budget} steps (mean ± std; dots: seeds)")
    bars.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("storage/bench-finetune"),
        help="videos, shards, checkpoints, results, table and plot (default storage/bench-finetune)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of both halves' configs (e.g. train.head_lr_mult=1, "
        "train.freeze_up_to=res3); the recipe keys apply to the fine-tunes only",
    )
    parser.add_argument("--classes", type=int, help=f"synthetic motion classes in all (default {d['classes']})")
    parser.add_argument(
        "--pretrain-classes",
        type=int,
        help=f"the first this many are pre-trained on, the rest fine-tuned on (default {d['pretrain_classes']})",
    )
    parser.add_argument("--videos-per-class", type=int, help=f"3/4 train, 1/4 val (default {d['videos_per_class']})")
    parser.add_argument("--pretrain-steps", type=int, help=f"default {d['pretrain_steps']}")
    parser.add_argument(
        "--steps", type=int, help=f"fine-tune and scratch budget, optimizer steps (default {d['steps']})"
    )
    parser.add_argument("--seeds", type=int, help=f"train.seed, train.seed + 1, ... (default {d['seeds']})")
    parser.add_argument(
        "--eval-every",
        type=int,
        metavar="STEPS",
        help=f"val top-1 every this many steps, for the curves and the steps to --target (default {d['eval_every']})",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=d["target"],
        help=f"the val top-1 whose steps are counted (default {d['target']})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=d["warmup"],
        help=f"share of the steps spent in linear LR warm-up (default {d['warmup']})",
    )
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated, the first is the headline (default {','.join(FORMATS)})",
    )
    parser.add_argument(
        "--every-format-every-seed",
        action="store_true",
        help="fine-tune from every format on every seed (default: the first format on every seed, "
        "the others on the first seed: the same weights in give the same training)",
    )
    parser.add_argument(
        "--workers", type=int, help="trainings at once, each in its own process (default: 2, 1 on one core)"
    )
    parser.add_argument("--threads", type=int, help="torch threads per training (default: cores / workers)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
    args = parser.parse_args(argv)
    for name, value in d.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)
    cores = os.cpu_count() or 1
    args.workers = args.workers if args.workers is not None else min(2, cores)
    args.threads = args.threads if args.threads is not None else max(1, cores // max(args.workers, 1))
    if (
        min(
            args.seeds,
            args.steps,
            args.pretrain_steps,
            args.eval_every,
            args.workers,
            args.threads,
            args.videos_per_class - 1,
        )
        < 1
    ):
        parser.error(
            "--seeds, --steps, --pretrain-steps, --eval-every, --workers and --threads must be at least 1, "
            "--videos-per-class at least 2 (train and val)"
        )
    if not 2 <= args.pretrain_classes <= args.classes - 2:
        parser.error(
            f"--pretrain-classes {args.pretrain_classes}: both halves need 2 or more classes of the "
            f"--classes {args.classes}"
        )
    if args.classes > len(class_names()):
        parser.error(f"--classes {args.classes}: the synthetic set has {len(class_names())}")
    if args.pretrain_classes * 2 == args.classes:
        parser.error(
            f"--pretrain-classes {args.pretrain_classes} of {args.classes}: the halves must differ in "
            "class count, or the foreign checkpoints (which name no classes) keep their head"
        )
    if not 0 < args.target <= 1 or not 0 <= args.warmup < 1:
        parser.error("--target in (0, 1], --warmup in [0, 1)")
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or not args.formats:
        parser.error(f"--formats: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(FORMATS)}")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    labels = class_names(args.classes)
    pre_labels, ft_labels = labels[: args.pretrain_classes], labels[args.pretrain_classes :]
    synth = synthetic_set(out, args.classes, args.videos_per_class, log)
    try:
        pre_cfg = half_config(out, PRETRAIN, class_folder(synth, pre_labels, out / "videos" / PRETRAIN), args.overrides)
        ft_cfg = half_config(
            out, "finetune", class_folder(synth, ft_labels, out / "videos" / "finetune"), args.overrides
        )
    except ConfigError as exc:
        print(f"bench finetune: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    import ray

    ray_before = ray.is_initialized()
    pre = prepare_data(pre_cfg, storage_of(pre_cfg), log=log)
    ft = prepare_data(ft_cfg, storage_of(ft_cfg), log=log)
    if ray.is_initialized() and not ray_before:
        ray.shutdown()  # preprocessing is done; its workers would only take memory and CPU from training
    prepared_s = time.perf_counter() - started
    log(
        f"bench finetune: pre-train on {len(pre.classes)} classes ({pre.train_clips} clips, {pre.val_videos} val "
        f"videos), fine-tune on {len(ft.classes)} ({ft.train_clips} clips, {ft.val_videos} val videos); "
        f"{args.steps} steps x {ft_cfg.train.batch_size} clips per arm, {args.seeds} seed(s)"
    )

    pretrain, scratch, finetune = plan(args, pre_cfg, ft_cfg, pre, ft, out)
    done, checks, trained = run_all(pretrain, scratch, finetune, args, log)
    pre_result = done[pretrain.path]
    results = [done[j.path] for j in (*scratch, *finetune)]

    arms = [SCRATCH] + [f"finetune-{f}" for f in args.formats]
    rows = summarize(results, arms, args.target)
    seeds = [j.seed for j in scratch]
    checked = findings(rows, checks, results, checks[0]["backbone_digest"], args.target, args.steps)
    wall, load = time.perf_counter() - started, os.getloadavg()
    cpu = pre_result["cpu_s"] + sum(r["cpu_s"] for r in results)
    t, recipe = ft_cfg.train, ", ".join(f"{k} {getattr(ft_cfg.train, k)}" for k in RECIPE_KEYS)
    title = (
        f"{ft_cfg.model.preset} fine-tuned from {len(pre.classes)} synthetic motion classes to {len(ft.classes)} "
        f"others ({ft.val_videos} val videos) vs scratch: {args.steps} steps x {t.batch_size} clips, "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    )
    md = "\n".join(
        [
            f"{title}\n",
            main_table(rows, args.steps, args.target),
            "",
            f"Pre-training: {', '.join(pre.classes)}; {args.pretrain_steps} steps, val top-1 "
            f"{pre_result['top1']:.3f} ({pre.val_videos} videos). Fine-tuning classes: {', '.join(ft.classes)} "
            f"(data.format folder). Both arms: base LR {t.base_lr} per 64 clips (lr "
            f"{t.base_lr * t.batch_size / 64:g}), {args.warmup:.0%} linear warm-up then cosine, crop {t.crop_size}, "
            f"the same clips in the same order; the fine-tune recipe: {recipe} (scratch: none of it). Video top-1 over "
            f"{ft_cfg.evaluate.temporal_views} temporal view(s) x {ft_cfg.evaluate.spatial_crops} crop(s), measured "
            f"every {args.eval_every} steps; std over seeds (sample std); "
            f"'>{args.steps}': not reached within the budget.",
            "",
            "The pre-trained network in each foreign format, and what each fine-tune started from (digests of every "
            "tensor but the BN step counters, and of the run's loss sequence):",
            "",
            format_table_md(checks, results, seeds),
            "",
            "Findings (a gap is beyond the spread when it exceeds the two stds added):",
            findings_text(checked),
            "",
            f"This run: {trained} trainings now, {len(results) + 1 - trained} done before; {wall:.0f}s wall (data "
            f"{prepared_s:.0f}s), {args.workers} trainings at a time x {args.threads} thread(s), "
            f"{os.cpu_count()} cores, "
            f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); the {len(results) + 1} "
            f"trainings took {cpu:.0f} CPU-s.",
        ]
    )
    (out / "finetune.md").write_text(md + "\n")
    plot(rows, out / "finetune.png", title, args.target, args.steps)
    summary = {
        "benchmark": "finetune",
        "environment": environment("cpu"),
        "argv": list(argv or sys.argv[1:]),
        "classes": {"pretrain": pre.classes, "finetune": ft.classes},
        "steps": args.steps,
        "pretrain_steps": args.pretrain_steps,
        "seeds": seeds,
        "eval_every": args.eval_every,
        "target": args.target,
        "warmup": args.warmup,
        "recipe": {k: getattr(t, k) for k in RECIPE_KEYS},
        "pretrain": {k: pre_result[k] for k in ("top1", "curve", "train_loss", "wall_s", "key")},
        "formats": checks,
        "arms": rows,
        "runs": results,
        "findings": checked,
        "trained_now": trained,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "prepare_s": round(prepared_s, 1),
        "load_average": [round(x, 2) for x in load],
        "workers": args.workers,
        "threads": args.threads,
    }
    publish_summary(
        summary,
        md,
        out / "summary.json",
        f"table {out / 'finetune.md'}, plot {out / 'finetune.png'}, summary {out / 'summary.json'}",
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
