"""Inference benchmark: views/s of `pipelines infer` (Ray Data: decode tasks -> scoring actor pool) with 1 and 2
scoring workers, against the same network's forward pass on views cut beforehand, in this process, on one thread.
Goals: 1 worker >= 0.9 x the baseline per scoring core (decoding never the bottleneck); 2 workers >= 1.8 x 1.

    python -m pipelines bench infer                   # slowfast_8x8_r50, crop 224, 16 videos; ~3-4 min on 2 cores
    python -m pipelines bench infer --quick --out /tmp/bench-infer   # smoke test: slowfast_tiny, tiny videos

Everything under --out (default storage/bench-infer): the synthetic videos (H.264, rendered by slowfast.video.synth,
kept for later runs), a fresh MLflow store with the model registered as the registry step registers one (fresh
weights: speed does not depend on them), each infer run's own fresh output folder, bench_infer.md and
bench_infer.json.

baseline: every video's test views cut first (ClipSpec.cut_views, timed apart: the decode cost per video), then
  VideoClassifier.score over them, timed alone, torch on 1 thread: the scoring actor's work with no decoding and
  no Ray. Built as the actor builds its classifier (the registered weights, views per forward = the spec's views).
  Half the videos are scored before the infer runs and half after, so that a drift in the machine's load hits
  the baseline and the runs alike.
infer: `pipelines.infer.run_infer` itself, into a fresh folder each, with infer.batch_videos 1 and commit_every_s 0
  so that every video is its own commit, on a local Ray this benchmark starts without the dashboard (infer uses
  neither it nor its State API; joined to a running Ray, it uses that one as it is). The scoring phase is read from
  the run's commit log (the manifests' committed_at): from the first commit to the second-to-last, over the views of
  the commits after the first up to that one. Ray Data's iter_batches hands the driver a result only once the next
  one has arrived, so a commit marks the arrival of the next video's result and the last two commits come together:
  the window runs from the second result's arrival to the last one's. That leaves out Ray Data's start-up, the
  model's load and the first video (the actor's construction and first-call warm-up); two workers in step deliver
  their first results together, so their window starts after both (and would, without the lag, as well). An actor
  that the pool starts late has its start-up inside the window: the figure then errs low, never high. (Subtracting
  the wall time of a shorter run instead would cancel the start-up only as well as it repeats, which varies by
  seconds from run to run.)
  1 worker: infer.cpus_per_worker 1, decode_cpus 1. 2 workers: cpus_per_worker 0.75 (still one torch thread) and
  decode_cpus 0.25, so both actors and two decode tasks fit in 2 CPUs: a whole CPU per decode task would leave no
  room for the second actor, and decoding a video costs a few percent of scoring it (the table's notes say how
  much). The CPU time of the scoring actors over the window is sampled from /proc (Linux, for a Ray this process
  started), giving views per scoring CPU-second; the decode tasks time their own CPU per video (they run ahead of
  scoring, so the window's share is their CPU per view times its views), giving views per CPU-second in all.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script or loaded by path: make `benchmarks` and `pipelines` importable
    sys.path.insert(0, str(_ROOT))

from benchmarks._common import CoreUse, environment, format_table, ratio, write_json  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.infer import run_infer  # noqa: E402
from pipelines.infer_out import MANIFESTS, Job  # noqa: E402
from pipelines.ray_runtime import init_ray  # noqa: E402
from pipelines.storage import S3Options, Storage  # noqa: E402
from slowfast.model import PRESETS, SlowFast  # noqa: E402
from slowfast.serving import ClipSpec, VideoClassifier  # noqa: E402
from slowfast.shards import manifest  # noqa: E402
from slowfast.video.synth import CLASSES, encode_video, iter_frames, sample_video  # noqa: E402

GOAL_PER_CORE, GOAL_SCALING = 0.9, 1.8
TARGET_FPS = 30.0
MODEL_NAME = "bench-infer"
DEFAULTS = {"preset": "slowfast_8x8_r50", "crop": 224, "videos": 16, "width": 320, "height": 240, "seconds": 3.5}
QUICK = {"preset": "slowfast_tiny", "crop": 32, "videos": 8, "width": 64, "height": 48, "seconds": 1.5}


@dataclass(frozen=True)
class Pool:
    """An infer run's CPU split (the infer section's keys)."""

    workers: int
    cpus_per_worker: float
    decode_cpus: float

    @property
    def label(self) -> str:
        return (
            f"{self.workers} worker{'s' * (self.workers > 1)} x {self.cpus_per_worker:g} CPU, "
            f"decode tasks {self.decode_cpus:g} CPU"
        )


RUNS = {"infer_1": Pool(1, 1.0, 1.0), "infer_2": Pool(2, 0.75, 0.25)}
CPUS_NEEDED = 2  # both splits hold 2 Ray CPUs


class InferCores(CoreUse):
    """CoreUse for run_infer's Ray processes: the Score actors and the cut_views decode tasks. Ray starts an actor
    in a worker process of its own, never in a task's idle one, so a process keeps the role it is first seen in."""

    ROLES = {"scoring": (b"ray::MapWorker",), "decode": (b"ray::MapBatches",)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- videos and model ------------------------------------------------------------------------------------


def make_videos(out: Path, args) -> Path:
    """--videos H.264 files in a folder of their own (the one --videos of infer names), kept for later runs;
    the motion classes cycle, so the encoded sizes (and the decode cost) vary as real videos' do."""
    folder = out / "videos" / f"{args.width}x{args.height}_{args.seconds:g}s_{args.videos}"
    missing = [i for i in range(args.videos) if not (folder / f"video-{i:03d}.mp4").is_file()]
    if missing:
        log(f"bench infer: writing {len(missing)} videos into {folder}")
    partial = out / "videos" / "partial"  # outside the folder: a file left by an interrupted run is not listed
    partial.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for i in missing:
        spec = sample_video(
            0, i % len(CLASSES), i, width=args.width, height=args.height, fps=TARGET_FPS, seconds=args.seconds
        )
        encode_video(partial / f"video-{i:03d}.mp4", iter_frames(spec), spec.fps)
        os.replace(partial / f"video-{i:03d}.mp4", folder / f"video-{i:03d}.mp4")
    return folder


def bench_config(out: Path, videos: Path, preset: str) -> PipelineConfig:
    """A pipeline config for infer alone: a fresh MLflow store under --out (the data section is not read)."""
    return PipelineConfig.model_validate(
        {
            "name": MODEL_NAME,
            "storage_root": str(out / "storage"),
            "data": {"dataset": "bench_infer", "format": "folder", "video_root": str(videos)},
            "model": {"preset": preset},
            "mlflow": {
                "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
                "experiment": MODEL_NAME,
                "model_name": MODEL_NAME,
            },
            # One video per scoring call and a commit after each: the commit log times every video.
            "infer": {"batch_videos": 1, "commit_every_s": 0.0},
        }
    )


def clip_spec(args) -> ClipSpec:
    """The preset's sampling at --crop, short side in the paper's proportion (224 from 256)."""
    model = PRESETS[args.preset]
    return ClipSpec(
        T=model.T,
        tau=model.tau,
        alpha=model.alpha,
        target_fps=TARGET_FPS,
        short_side=2 * math.ceil(args.crop * 8 / 7 / 2),
        crop=args.crop,
        temporal_views=args.temporal_views,
        spatial_crops=args.spatial_crops,
    )


def register(cfg: PipelineConfig, spec: ClipSpec) -> str:
    """The preset with fresh weights (400 classes, as Kinetics), logged and registered as the registry step does;
    returns its models:/ URI."""
    torch.manual_seed(0)
    net = SlowFast(cfg.model.to_slowfast_config())
    names = [f"class {i}" for i in range(net.head.fc.out_features)]
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg, log=log)).info.run_id
    version = tracking.log_model(cfg, run_id, net=net, class_names=names, spec=spec, metadata={"benchmark": "infer"})
    tracking.close_run(cfg, run_id)
    return f"models:/{MODEL_NAME}/{version}"


# -- baseline: the forward pass alone --------------------------------------------------------------------


def cut_all(spec: ClipSpec, paths: list[Path]) -> tuple[list, list[float]]:
    """Every video's (fast, slow_index) views, and the CPU seconds each cut took."""
    views, cpu = [], []
    for path in paths:
        start = time.process_time()
        views.append(spec.cut_views(str(path)))
        cpu.append(time.process_time() - start)
    return views, cpu


def score_all(classifier: VideoClassifier, views: list) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of VideoClassifier.score per video."""
    wall, cpu = [], []
    for fast, slow_index in views:
        start, start_cpu = time.perf_counter(), time.process_time()
        classifier.score(fast, slow_index)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def baseline_figures(views: int, cut_cpu: list[float], before: tuple[list, list], after: tuple[list, list]) -> dict:
    wall, cpu = before[0] + after[0], before[1] + after[1]
    per_video = views / len(wall)
    return {
        "videos": len(wall),
        "views": views,
        "views_per_s": views / sum(wall),
        "views_per_cpu_s_scoring": views / sum(cpu),
        "views_per_cpu_s_all": views / (sum(cpu) + sum(cut_cpu)),
        "before_views_per_s": per_video * len(before[0]) / sum(before[0]),
        "after_views_per_s": per_video * len(after[0]) / sum(after[0]),
        "cores": sum(cpu) / sum(wall),
        "score_cpu_s_per_video": statistics.mean(cpu),
        "cut_cpu_s_per_video": statistics.mean(cut_cpu),
        "score_s": [round(s, 3) for s in wall],
    }


# -- infer: the real thing -------------------------------------------------------------------------------


def scoring_window(commits: list[tuple[float, int]]) -> tuple[float, float, int]:
    """(opens, closes, views) of the scoring phase from (committed_at, views) per commit: the first commit to the
    second-to-last, over the views of the commits after the first up to that one (the module docstring says why)."""
    commits = sorted(commits)
    if len(commits) < 3:
        raise RuntimeError(f"bench infer: {len(commits)} commits; the window needs 3 or more (raise --videos)")
    return commits[0][0], commits[-2][0], sum(v for _, v in commits[1:-1])


def infer_case(
    cfg: PipelineConfig, uri: str, videos: Path, out: Path, pool: Pool, expected_videos: int, expected_views: int
) -> dict:
    """run_infer into a fresh `out` with `pool`'s CPU split: the scoring phase's views/s and CPU use."""
    shutil.rmtree(out, ignore_errors=True)
    run_cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update=asdict(pool))})
    log(f"bench infer: infer, {pool.label}")
    started = time.time()
    with InferCores() as cores:
        summary = run_infer(run_cfg, uri, str(videos), str(out), Job(), log=log)
    # The runs and the baseline compare only over the same work: every video, every view.
    scored = (summary["scored_now"], summary["quarantined_now"], summary["views_now"])
    if scored != (expected_videos, 0, expected_views):
        raise RuntimeError(
            f"bench infer: the run with {pool.label} scored {scored[0]} of {expected_videos} videos "
            f"({scored[1]} quarantined, see {summary['quarantine_report']}), {scored[2]} of "
            f"{expected_views} views"
        )
    commits = sorted(
        (c.committed_at, sum(v.clips for v in c.videos if not v.quarantined))
        for c in manifest.load_commits(Storage(str(out), S3Options()), MANIFESTS)
    )
    opens, closes, views = scoring_window(commits)
    span = closes - opens
    used = cores.between(opens, closes)
    scoring_cpu = used["scoring_cores"] * span if used else None
    # Decode tasks run ahead of scoring (on short videos all may be cut before the window opens), so the
    # window's share of decoding is the CPU time the tasks themselves measured per view, times its views.
    cut_cpu_per_view = summary["cut_cpu_s"] / summary["views_now"]
    all_cpu = scoring_cpu + cut_cpu_per_view * views if used else None
    rate = views / span
    return {
        **asdict(pool),
        "videos": summary["scored_now"],
        "quarantined": summary["quarantined_now"],
        "views": summary["views_now"],
        "commits": len(commits),
        "window_views": views,
        "window_s": span,
        "window_opens_after_s": opens - started,
        "run_wall_s": summary["wall_s"],
        "views_per_s": rate,
        "views_per_s_per_scoring_core": rate / pool.workers,
        "views_per_cpu_s_scoring": views / scoring_cpu if scoring_cpu else None,
        "views_per_cpu_s_all": views / all_cpu if all_cpu else None,
        "cut_cpu_s_per_view": cut_cpu_per_view,
        "score_cpu_s_per_view": summary["score_cpu_s"] / summary["views_now"],
        "cores": used,
        "commit_times_s": [round(t - started, 2) for t, _ in commits],
    }


# -- report ----------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:,.{digits}f}"


def figures(results: dict) -> dict:
    """The ratios the goals are about, the bound 2 cores put on the second, and what the 2-worker run left for it."""
    base, one, two = results["baseline"], results["runs"]["infer_1"], results["runs"]["infer_2"]
    score, cut = base["score_cpu_s_per_video"], base["cut_cpu_s_per_video"]
    out = {
        "one_worker_per_core_over_baseline": ratio(one["views_per_s_per_scoring_core"], base["views_per_s"]),
        "one_worker_per_cpu_s_over_baseline": ratio(one["views_per_cpu_s_scoring"], base["views_per_cpu_s_scoring"]),
        "two_workers_over_one": ratio(two["views_per_s"], one["views_per_s"]),
        # Below 1 where a second worker costs efficiency; near 1, a views/s ratio short of 2 is the cores it got.
        "two_workers_over_one_per_cpu_s": ratio(two["views_per_cpu_s_scoring"], one["views_per_cpu_s_scoring"]),
        # Two cores that also decode every video score at most 2 x score / (score + decode) of one core's rate.
        "two_workers_over_one_bound_on_2_cores": round(2 * score / (score + cut), 3),
        "decode_share": round(cut / score, 4),
    }
    used = two["cores"]
    if used and one["cores"]:
        # Whatever was busy in the 2-worker window besides the actors and the decode tasks: Ray's own processes
        # (GCS, raylet, agents, Ray Data's helper actors), the driver, and any other work on the machine. The
        # cores left over are all the actors could get; at the efficiency they ran at, that caps the ratio.
        rest = max(used["machine_busy_cores"] - used["scoring_cores"] - used["decode_cores"], 0.0)
        room = (os.cpu_count() or 1) - used["decode_cores"] - rest
        out["two_workers_other_cores"] = round(rest, 3)
        out["two_workers_over_one_reachable"] = round(
            room / one["cores"]["scoring_cores"] * out["two_workers_over_one_per_cpu_s"], 3
        )
    return out


def table(results: dict) -> str:
    base, runs = results["baseline"], results["runs"]
    rows = [
        [
            "baseline: VideoClassifier.score on views cut beforehand, 1 thread",
            _f(base["views_per_s"]),
            _f(base["views_per_s"]),
            "1.000",
            None,
            _f(base["views_per_cpu_s_scoring"]),
            "1.000",
            _f(base["views_per_cpu_s_all"]),
            None,
        ]
    ]
    for name, goal in (
        ("infer_1", f"per core / baseline >= {GOAL_PER_CORE}"),
        ("infer_2", f"/ 1 worker >= {GOAL_SCALING}"),
    ):
        run = runs[name]
        rows.append(
            [
                f"infer: {Pool(run['workers'], run['cpus_per_worker'], run['decode_cpus']).label}",
                _f(run["views_per_s"]),
                _f(run["views_per_s_per_scoring_core"]),
                _f(ratio(run["views_per_s_per_scoring_core"], base["views_per_s"]), 3),
                _f(ratio(run["views_per_s"], runs["infer_1"]["views_per_s"]), 3),
                _f(run["views_per_cpu_s_scoring"]),
                _f(ratio(run["views_per_cpu_s_scoring"], base["views_per_cpu_s_scoring"]), 3),
                _f(run["views_per_cpu_s_all"]),
                goal,
            ]
        )
    return format_table(
        [
            "case",
            "views/s",
            "views/s per scoring core",
            "per core / baseline",
            "/ 1 worker",
            "views per scoring CPU-s",
            "per CPU-s / baseline",
            "views per CPU-s (all)",
            "goal",
        ],
        rows,
    )


def report(results: dict, args, command: str) -> str:
    base, runs, ratios, spec = results["baseline"], results["runs"], results["ratios"], results["spec"]
    title = (
        f"Inference throughput: {args.preset}, crop {spec['crop']} (short side {spec['short_side']}), "
        f"{spec['temporal_views']} temporal x {spec['spatial_crops']} spatial view(s) per video, "
        f"{args.videos} videos {args.width}x{args.height} {args.seconds:g} s (H.264), CPU, fp32, 1 torch "
        f"thread per scoring worker"
    )
    notes = [
        "views/s of infer: from the first commit (one per video) to the second-to-last, which mark the arrival of the "
        "second result and of the last (Ray Data hands the driver a result once the next one has arrived); Ray "
        "start-up, model load and the first video are left out. Per scoring core: views/s / workers (one torch "
        "thread each).",
        "views per CPU-s: per CPU second of the scoring process (baseline: this process; infer: the Score actors), "
        "sampled from /proc, and (all) with the decoding too (baseline: the cut_views calls; infer: the CPU time "
        "the decode tasks measured per view, times the window's views).",
        f"Decoding and cutting a video's views took {base['cut_cpu_s_per_video']:.3f} CPU-s, scoring it "
        f"{base['score_cpu_s_per_video']:.3f} CPU-s ({100 * ratios['decode_share']:.1f}%): on 2 cores, 2 workers "
        f"can reach at most {ratios['two_workers_over_one_bound_on_2_cores']:.3f}x one worker.",
        f"Baseline: {base['before_views_per_s']:.2f} views/s on the videos scored before the infer runs, "
        f"{base['after_views_per_s']:.2f} after; {base['cores']:.2f} cores (CPU time / wall time).",
    ]
    one, two = runs["infer_1"], runs["infer_2"]
    if one["cores"] and two["cores"]:
        notes.append(
            f"2 workers / 1: {ratios['two_workers_over_one']:.3f}x views/s, with the scoring actors on "
            f"{two['cores']['scoring_cores']:.2f} cores in the window against "
            f"{one['cores']['scoring_cores']:.2f}; per scoring CPU-s "
            f"{ratios['two_workers_over_one_per_cpu_s']:.3f}x."
        )
        used = two["cores"]
        notes.append(
            f"In the 2-worker window, everything else (Ray's own processes, the driver, other work) took "
            f"{ratios['two_workers_other_cores']:.2f} cores and the decode tasks "
            f"{used['decode_cores']:.2f}; at the actors' per-CPU-s ratio, the cores left to them allow "
            f"at most {ratios['two_workers_over_one_reachable']:.3f}x one worker on this machine."
        )
    for name, run in runs.items():
        cores = run["cores"]
        notes.append(
            f"{name}: scored {run['videos']}/{args.videos} videos ({run['views']} views, {run['quarantined']} "
            f"quarantined) in {run['run_wall_s']:.1f} s all told; the window opened {run['window_opens_after_s']:.1f} "
            f"s after the start and held {run['window_views']} views over {run['window_s']:.1f} s"
            + (
                f"; in it the scoring actors used {cores['scoring_cores']:.2f} cores, the decode tasks "
                f"{cores['decode_cores']:.2f}, the machine was busy on {cores['machine_busy_cores']:.2f} of "
                f"{os.cpu_count()}."
                if cores
                else "; CPU use not sampled (no /proc, or a Ray this process did not start)."
            )
        )
    load, machine_cores = results["load_average_max"], os.cpu_count() or 1
    if load > machine_cores - 0.5:
        notes.append(
            f"Load average up to {load:.1f} on {machine_cores} cores: other work shared the machine, the "
            "wall-clock figures suffer from it (the per-CPU-second ones less)."
        )
    return "\n".join([title, "", table(results), "", *notes, "", f"    {command}"])


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench infer", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help=f"model preset (default {DEFAULTS['preset']})")
    parser.add_argument("--crop", type=int, help=f"test crop (default {DEFAULTS['crop']})")
    parser.add_argument("--temporal-views", type=int, default=1, help="temporal views per video (default 1)")
    parser.add_argument(
        "--spatial-crops", type=int, default=1, choices=(1, 3), help="spatial crops per view (default 1)"
    )
    parser.add_argument("--videos", type=int, help=f"synthetic videos (default {DEFAULTS['videos']})")
    parser.add_argument("--width", type=int, help=f"video width (default {DEFAULTS['width']})")
    parser.add_argument("--height", type=int, help=f"video height (default {DEFAULTS['height']})")
    parser.add_argument("--seconds", type=float, help=f"video length (default {DEFAULTS['seconds']})")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("storage/bench-infer"),
        help="videos, MLflow store, infer outputs, bench_infer.md and .json (default storage/bench-infer)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
    )
    args = parser.parse_args(argv)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
    model = PRESETS[args.preset]
    span = model.T * model.tau / TARGET_FPS
    if args.videos < 4:
        parser.error(f"--videos {args.videos}: at least 4 (the timed window leaves out the first and the last)")
    if args.crop < 32:
        parser.error(f"--crop {args.crop}: at least 32 (the network downsamples by 32)")
    if args.width % 2 or args.height % 2 or min(args.width, args.height) < 16:
        parser.error(f"{args.width}x{args.height}: --width and --height must be even and at least 16 (yuv420p)")
    if not args.seconds >= span:
        parser.error(f"--seconds {args.seconds:g}: a {args.preset} clip spans {span:.2f} s; give at least that")
    if args.temporal_views < 1:
        parser.error(f"--temporal-views {args.temporal_views}: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import ray

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else os.cpu_count() or 1
    if cpus < CPUS_NEEDED:
        print(f"bench infer: {cpus:g} CPU(s); the 2-worker run needs {CPUS_NEEDED}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "pipelines", "bench", "infer", *argv])
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the baseline scores as each actor does (cpus_per_worker <= 1: one thread)
    load = [os.getloadavg()[0]]
    videos = make_videos(out, args)
    paths = sorted(videos.glob("*.mp4"))
    # A fresh registry each run: a new version of a 35M-parameter model per run would pile up.
    shutil.rmtree(out / "storage", ignore_errors=True)
    (out / "mlflow.db").unlink(missing_ok=True)
    cfg = bench_config(out, videos, args.preset)
    spec = clip_spec(args)
    log(f"bench infer: registering {args.preset} (fresh weights)")
    uri = register(cfg, spec)
    loaded = tracking.load_registered(cfg, uri)
    # As the Score actor builds it: one forward per video's views.
    classifier = VideoClassifier(loaded.model, loaded.class_names, loaded.spec, batch_views=loaded.spec.views)
    log(f"bench infer: baseline, cutting the views of {len(paths)} videos")
    views, cut_cpu = cut_all(loaded.spec, paths)
    classifier.score(*views[0])  # untimed: the first call sets up the kernels
    half = len(views) // 2
    log(f"bench infer: baseline, scoring {half} videos")
    before = score_all(classifier, views[:half])
    load.append(os.getloadavg()[0])
    started_ray = not ray.is_initialized()
    runs = {}
    try:
        if started_ray:
            # No dashboard: infer uses neither it nor its State API, and on 2 cores its share of a core
            # (~0.07 while infer runs, measured) comes out of the second scoring actor's.
            init_ray(cfg, dashboard=False)
        for name, pool in RUNS.items():
            runs[name] = infer_case(cfg, uri, videos, out / "runs" / name, pool, len(paths), len(paths) * spec.views)
            load.append(os.getloadavg()[0])
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    log(f"bench infer: baseline, scoring {len(views) - half} videos")
    after = score_all(classifier, views[half:])
    load.append(os.getloadavg()[0])
    results = {
        "baseline": baseline_figures(len(views) * spec.views, cut_cpu, before, after),
        "runs": runs,
        "spec": asdict(spec),
        "load_average_max": max(load),
    }
    results["ratios"] = figures(results)
    text = report(results, args, command)
    (out / "bench_infer.md").write_text(text + "\n")
    write_json(
        out / "bench_infer.json",
        {
            "benchmark": "infer",
            "command": command,
            "environment": environment("cpu"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "config": {
                "preset": args.preset,
                "model_uri": uri,
                "spec": asdict(spec),
                "videos": len(paths),
                "views_per_video": spec.views,
                "size": [args.width, args.height],
                "seconds": args.seconds,
                "batch_videos": cfg.infer.batch_videos,
                "commit_every_s": cfg.infer.commit_every_s,
            },
            "baseline": results["baseline"],
            "runs": runs,
            "ratios": results["ratios"],
            "goals": {"one_worker_per_core_over_baseline": GOAL_PER_CORE, "two_workers_over_one": GOAL_SCALING},
            "every_video_scored": all(
                r["videos"] == len(paths) and r["views"] == len(paths) * spec.views for r in runs.values()
            ),
            "load_average_max": round(max(load), 2),
        },
    )
    print(text)
    print(f"\nresults written to {out / 'bench_infer.md'} and {out / 'bench_infer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
