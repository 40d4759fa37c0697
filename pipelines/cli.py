"""`python -m pipelines <command>` (console script `slowfast-pipeline`): argument parsing and dispatch.

Exit codes: 0 done, 1 failed, 2 bad config or arguments (before any work).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pipelines
from pipelines import ray_runtime
from pipelines.config import ConfigError, PipelineConfig, SynthSection, load_config
from pipelines.errors import PipelineError
from slowfast.video.clips import MAX_CLIPS, MAX_WINDOWS, positive_seconds
from slowfast.video.decode import REASONS

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

REPO_ROOT = Path(pipelines.__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "set", None) and not args.config:
            args.parser.error("--set needs --config")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    ray_runtime.set_verbose(getattr(args, "verbose", False))
    config = None
    if getattr(args, "config", None):
        try:
            config = load_config(args.config, args.set)
        except ConfigError as exc:
            print(f"pipelines {args.command}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        return args.handler(args, config)
    except user_errors() as exc:  # evaluated once an exception arrives, when its module is loaded
        print(f"pipelines {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED


def user_errors() -> tuple[type[Exception], ...]:
    """The errors whose message is the whole report (what failed, on which input, what to do): PipelineError,
    and slowfast's CheckpointError once slowfast.model.checkpoint is loaded (importing it here would import
    torch for --help and config errors; it cannot have raised before it was loaded)."""
    checkpoint = sys.modules.get("slowfast.model.checkpoint")
    return (PipelineError,) + ((checkpoint.CheckpointError,) if checkpoint else ())


def cmd_bench(args: argparse.Namespace, config: PipelineConfig | None) -> int:
    what = f"bench {args.target}"
    script = REPO_ROOT / "benchmarks" / f"bench_{args.target}.py"
    if not script.is_file():
        print(f"pipelines {what}: benchmarks/ not found: run from a source checkout", file=sys.stderr)
        return EXIT_FAILED
    # Loaded by path: benchmarks/ is a folder of scripts in the checkout, not an installed package.
    spec = importlib.util.spec_from_file_location(f"bench_{args.target}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(module)
        result = module.main(args.args)
    finally:
        sys.path.remove(str(script.parent))
    return result if isinstance(result, int) else EXIT_OK


def cmd_synth(args: argparse.Namespace, config: PipelineConfig | None) -> int:
    from pipelines.data import synthesize

    synth = config.data.synth if config and config.data.synth else None
    out = args.out or (config.data.video_root if config else None)
    if not out:
        args.parser.error("--out DIR is needed without --config")
    defaults = synth or SynthSection()
    synthesize(
        out,
        args.classes or defaults.classes,
        args.videos_per_class or defaults.videos_per_class,
        defaults.seed if args.seed is None else args.seed,
        size=defaults.size,
        seconds=defaults.seconds,
        val_fraction=defaults.val_fraction,
    )
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.data import run_ingest

    plan = run_ingest(config)
    total = sum(len(sp.todo) for sp in plan.splits.values())
    print(f"summary: {len(plan.classes)} classes; {total} videos to decode (run `preprocess` to decode them)")
    return EXIT_OK


def cmd_preprocess(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.data import run_preprocess

    retry = frozenset(args.retry_quarantined or (REASONS if args.retry_quarantined == [] else ()))
    out = run_preprocess(config, args.split or None, retry_quarantined=retry)
    parts = [
        f"{s}: {o['processed']} videos, {o['clips']} clips, {o['quarantined']} quarantined"
        + (f", {o['unread']} unread (run again to read them)" if o["unread"] else "")
        for s, o in out["splits"].items()
    ]
    print(f"summary: {'; '.join(parts)}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.train import train

    out = train(config, run_name=args.run_name)
    m = out["metrics"]
    figures = ", ".join(f"{k} {m[k]:.3f}" for k in ("train_loss", "val_top1", "val_top5") if m.get(k) is not None)
    print(
        f"summary: run {out['run_name']}: {out['epochs_done']}/{out['epochs']} epochs "
        f"({out['epochs_run_now']} run now); {figures or 'no epoch finished'}\n"
        f"  best checkpoint  {out['best_checkpoint']} (val_top1 {out['best_val_top1']})\n"
        f"  checkpoints      {out['run_dir']}\n"
        f"  mlflow run       {out['mlflow_run_id']} ({out['tracking_uri']})"
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.evaluate import evaluate

    r = evaluate(config, args.model_uri)
    print(
        f"summary: {r['model_uri']}: top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f}, mean class accuracy "
        f"{r['mean_class_accuracy']:.3f} on {r['num_videos']} videos x {r['views_per_video']} views\n"
        f"  artifacts  {r['artifacts']} (result.json, confusion.png, per_class.csv)"
    )
    return EXIT_OK


def cmd_promote(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Register the latest evaluated checkpoint (or take --version) and run the promotion gate."""
    from pipelines.checkpoints import load_model
    from pipelines.data import storage_of
    from pipelines.evaluate import eval_set, evaluate
    from pipelines.registry import promote, register

    store = storage_of(config)
    es = eval_set(config, store)
    version = args.version
    if version is None:
        model = load_model(config, store, None)
        version = register(config, evaluate(config, model.uri, es=es, model=model), model=model, es=es)["model_version"]
    r = promote(config, version, es=es)
    print(f"summary: {r['model_uri']} {r['decision']} ({r['reason']}); aliases {', '.join(r['aliases']) or 'none'}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace, config: PipelineConfig | None) -> int:
    from pipelines import tracking

    # Flag checks come first: a typo must not cost a model download and a video decode.
    if not args.timeline:
        needs = [
            flag
            for flag, value in (("--window-s", args.window_s), ("--stride-s", args.stride_s), ("--plot", args.plot))
            if value is not None
        ]
        if needs:
            args.parser.error(f"{', '.join(needs)} only with --timeline (add --timeline for a per-window timeline)")
    for flag, value in (("--window-s", args.window_s), ("--stride-s", args.stride_s)):
        if value is not None and not positive_seconds(value):
            args.parser.error(f"{flag} must be a number of seconds > 0, got {value}")
    if args.top_k < 1:
        args.parser.error(f"--top-k must be 1 or more, got {args.top_k}")
    for flag, value in (("--max-windows", args.max_windows), ("--max-clips", args.max_clips)):
        if value < 1:
            args.parser.error(f"{flag} must be 1 or more, got {value}")
    if args.model_uri is None and config is None:
        args.parser.error("give --model-uri, or --config to use models:/<mlflow.model_name>@champion")
    uri = args.model_uri or f"models:/{config.mlflow.model_name}@champion"
    try:
        classifier = tracking.load_registered(config, uri)
    except tracking.TrackingError as exc:
        print(f"pipelines predict: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from pipelines.infer_out import LIMIT_FLAGS
    from slowfast.video.clips import TimelineLimitError, TimelineLimits
    from slowfast.video.decode import VideoDecodeError

    limits = TimelineLimits(max_windows=args.max_windows, max_clips=args.max_clips)
    failed, results = 0, []
    for video in args.videos:
        try:
            if args.timeline:
                result = classifier.timeline(
                    video, window_s=args.window_s, stride_s=args.stride_s, top_k=args.top_k, limits=limits
                )
            else:
                (result,) = classifier.predict([video], top_k=args.top_k)
        except VideoDecodeError as exc:  # its message names the video
            print(f"pipelines predict: cannot classify: {exc}", file=sys.stderr)
            failed += 1
            continue
        except TimelineLimitError as exc:
            print(
                f"pipelines predict: {video}: {exc.problem}; raise {LIMIT_FLAGS[exc.key]} to allow it", file=sys.stderr
            )
            failed += 1
            continue
        except OSError as exc:  # the file is there but cannot be read (permissions, I/O)
            print(f"pipelines predict: {video}: cannot read ({exc.strerror or exc})", file=sys.stderr)
            failed += 1
            continue
        results.append(result)
        if args.timeline:
            windows = result["windows"]
            every = f", every {windows[1]['start_s'] - windows[0]['start_s']:.2f} s" if len(windows) > 1 else ""
            print(
                f"{video}  ({len(windows)} window{'s' * (len(windows) > 1)} of "
                f"{windows[0]['end_s'] - windows[0]['start_s']:.2f} s{every})"
            )
            for segment in result["segments"]:
                print(
                    f"  {segment['start_s']:7.2f} - {segment['end_s']:7.2f} s  {segment['label']:<32} "
                    f"{segment['score']:.3f}"
                )
        else:
            print(video)
            for rank, (label, score) in enumerate(zip(result["labels"], result["scores"], strict=True), 1):
                print(f"  {rank}. {label:<32} {score:.3f}")
    written = []
    if args.json and results:
        # One video's timeline is the object VideoClassifier.timeline returns (a pyfunc row's shape); top-k
        # results are the list VideoClassifier.predict returns, whatever the count.
        shaped = results[0] if args.timeline and len(args.videos) == 1 else results
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(shaped, indent=1) + "\n")
        written.append(args.json)
    if args.plot and results:
        from pipelines.timeline_plot import timeline_png

        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        written.append(str(timeline_png(results, args.plot)))
    if written:
        print(f"summary: {len(results)} of {len(args.videos)} videos; wrote {', '.join(written)}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_infer(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.infer import run_infer
    from pipelines.infer_out import Job

    uri = args.model_uri or f"models:/{config.mlflow.model_name}@champion"
    job = Job(
        top_k=args.top_k,
        windows=args.windows,
        window_s=args.window_s,
        stride_s=args.stride_s,
        embeddings=args.embeddings,
        max_windows=args.max_windows,
        max_clips=args.max_clips,
    )
    s = run_infer(config, uri, args.videos, args.out, job)
    unread = ", ".join(f"{k} {v}" for k, v in s["unread_reasons"].items())
    print(
        f"summary: {s['scored_now']} videos scored now ({s['views_now']} views, {s['videos_per_s']} videos/s), "
        f"{s['quarantined_now']} unreadable"
        + (f", {s['unread_now']} not read ({unread}: the next run scores them)" if s["unread_now"] else "")
        + f"; {s['scored_total']} scored in all, {s['wall_s']:.0f}s\n"
        + (
            f"  CPU time: decoding {s['cut_cpu_s']:.1f} s, scoring {s['score_cpu_s']:.1f} s\n"
            if s["scored_now"]
            else ""
        )
        + f"  predictions  {s['predictions']}"
        + (f"\n  windows      {s['windows']}" if s["windows"] else "")
        + f"\n  quarantine   {s['quarantine_report']} ({s['quarantined_total']} "
        f"video{'s' * (s['quarantined_total'] != 1)})"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace, config: PipelineConfig | None) -> int:
    from pipelines.export import ExportError, export_model

    try:
        export_model(config, args.model_uri, args.format, args.out)
    except ExportError as exc:
        print(f"pipelines export: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_run(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.workflow import run
    from slowfast.model import SlowFast, count_flops, count_params, example_inputs

    cfg = config.model.to_slowfast_config()
    size = config.train.crop_size
    changed = ", ".join(f"{k}={v}" for k, v in config.model.overrides().items()) or "none"
    model = SlowFast(cfg).eval()
    print(
        f"pipelines run: {args.config} (config hash {config.config_hash()[:12]})\n"
        f"  name           {config.name}\n"
        f"  storage_root   {config.storage_root}\n"
        f"  model          {config.model.preset} (overrides: {changed})\n"
        f"  params         {count_params(model):,} (at {cfg.num_classes} classes; the head follows the dataset)\n"
        f"  GFLOPs         {count_flops(model, example_inputs(cfg, 1, size)) / 1e9:.3f} per clip at {size}x{size}, "
        f"{cfg.slow_frames} slow + {cfg.fast_frames} fast frames",
        flush=True,
    )
    del model
    s = run(config, from_step=args.from_step, only=args.only, force=args.force)
    print_summary(s, config, args.config, args.set)
    return EXIT_OK


def print_summary(s: dict, config: PipelineConfig, config_path: str, overrides: list[str] = ()) -> None:
    m = s["metrics"]
    steps = ", ".join(f"{k} {v['status']} ({v['wall_s']:.0f}s)" for k, v in s["steps"].items())
    print(f"summary: run {s['run_id']}: {steps}")
    if m.get("top1") is not None:
        print(
            f"  eval           top-1 {m['top1']:.3f}, top-5 {m['top5']:.3f}, mean class accuracy "
            f"{m['mean_class_accuracy']:.3f} on {m['num_videos']} videos"
        )
    if s.get("model_uri"):
        verdict = "promoted to champion" if s["promoted"] else "not promoted"
        print(f"  model          {s['model_uri']} ({verdict}: {s['reason']}); aliases {', '.join(s['aliases'])}")
        tracking = s.get("tracking_uri") or config.mlflow.tracking_uri
        ui = f"mlflow ui --backend-store-uri {tracking}" if tracking.startswith("sqlite") else tracking
        print(f"  MLflow UI      {ui}  (then http://127.0.0.1:5000)")
        # The --set overrides that say where the registry is travel with the hint.
        where = "".join(
            f" --set {shlex.quote(o)}" for o in overrides if o.startswith(("mlflow.", "s3.", "storage_root"))
        )
        print(f"  predict        python -m pipelines predict VIDEO.mp4 --config {shlex.quote(config_path)}{where}")
    print(f"  records        {s['records']}/summary.json")


def cmd_status(args: argparse.Namespace, config: PipelineConfig) -> int:
    from pipelines.workflow import STEPS, list_runs

    runs = list_runs(config)
    if args.run_id:
        runs = [r for r in runs if r["run_id"] == args.run_id]
        if not runs:
            print(f"pipelines status: no run {args.run_id} under {config.storage_root}/runs", file=sys.stderr)
            return EXIT_FAILED
    if not runs:
        print(f"no runs under {config.storage_root}/runs yet: `python -m pipelines run --config {args.config}`")
        return EXIT_OK
    for r in runs if args.run_id or args.all else runs[:10]:
        line = f"{r['run_id']}  {r['status']:<11}  started {r.get('started', '?')}"
        summary = r.get("summary")
        if summary and summary.get("model_uri"):
            line += f"  {summary['model_uri']} top-1 {summary['metrics']['top1']:.3f}" + (
                " (promoted)" if summary["promoted"] else ""
            )
        print(line)
        for step in STEPS:
            rec = r["step_records"].get(step)
            if rec:
                detail = f"  {rec.get('error', '')}" if rec["status"] == "failed" else ""
                print(f"    {step:<11} {rec['status']:<8} {rec.get('wall_s', '')!s:>7}s{detail}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Train SlowFast video models: synthetic or Kinetics-style data -> Ray Data shards -> "
        "Ray Train -> MLflow registry.",
        epilog="Exit codes: 0 done, 1 failed, 2 bad config or arguments.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, handler, config: str | None = "required"):
        sub = commands.add_parser(name, help=help, description=help)
        if config:
            sub.add_argument(
                "--config",
                metavar="PATH",
                required=config == "required",
                help="pipeline YAML (e.g. configs/demo.yaml); validated before any work",
            )
            sub.add_argument(
                "--set",
                metavar="KEY=VALUE",
                action="append",
                default=[],
                help="override a config key, e.g. --set train.epochs=3 (repeatable; YAML values)",
            )
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    from pipelines.workflow import STEPS

    steps = list(STEPS)
    run = command(
        "run", "the whole workflow: " + " -> ".join(steps) + "; resumes where the last run stopped", handler=cmd_run
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--from",
        dest="from_step",
        metavar="STEP",
        choices=steps,
        help=f"start at STEP, reusing earlier steps' outputs ({', '.join(steps)})",
    )
    where.add_argument("--only", metavar="STEP", choices=steps, help="run STEP alone")
    run.add_argument(
        "--force",
        metavar="STEP",
        action="append",
        default=[],
        choices=steps,
        help="re-run STEP even if it is up to date (repeatable)",
    )

    synth = command(
        "synth",
        "generate the synthetic motion dataset (videos + annotations); defaults from data.synth of --config",
        config="optional",
        handler=cmd_synth,
    )
    synth.add_argument("--out", metavar="DIR", help="output folder (default: data.video_root)")
    synth.add_argument("--classes", metavar="N", type=int, help="number of motion classes")
    synth.add_argument("--videos-per-class", metavar="M", type=int, help="videos per class, train and val")
    synth.add_argument("--seed", metavar="S", type=int, help="random seed; same seed, same videos")

    command(
        "ingest",
        "plan the work: which annotation rows and videos are new or changed since the last run",
        handler=cmd_ingest,
    )
    preprocess = command(
        "preprocess", "Ray Data: decode, pre-sample clips, write Parquet shards and manifests", handler=cmd_preprocess
    )
    preprocess.add_argument(
        "--split",
        metavar="SPLIT",
        action="append",
        default=[],
        help="split to preprocess (repeatable; default: data.train_split and data.val_split)",
    )
    preprocess.add_argument(
        "--retry-quarantined",
        metavar="REASON",
        nargs="*",
        choices=REASONS,
        help="decode again the videos committed as quarantined for these reasons (none given: "
        f"all of {', '.join(REASONS)}), e.g. after a decoder upgrade",
    )
    train = command(
        "train",
        "Ray Train: train SlowFast on the shards, with checkpoints that survive worker loss; "
        "re-running the same command resumes after the last checkpoint",
        handler=cmd_train,
    )
    train.add_argument(
        "--run-name",
        metavar="NAME",
        help="checkpoints go to storage_root/checkpoints/NAME and the same name resumes "
        "(default: the pipeline name and a digest of model, train and the shards)",
    )
    evaluate = command(
        "evaluate", "multi-view evaluation: video-level top-1/top-5, per class, confusion matrix", handler=cmd_evaluate
    )
    evaluate.add_argument(
        "--model-uri",
        metavar="URI",
        help="model to evaluate: a checkpoint (folder or file, local or s3://), models:/NAME/VERSION "
        "or models:/NAME@ALIAS (default: the best checkpoint of the newest training run)",
    )
    promote = command(
        "promote",
        "register the evaluated model as challenger; make it champion if it beats "
        "the current one by mlflow.promote_margin on the same eval shards",
        handler=cmd_promote,
    )
    promote.add_argument(
        "--version", metavar="N", type=int, help="registered model version to consider (default: the latest)"
    )
    predict = command("predict", "classify video files with a registered model", config="optional", handler=cmd_predict)
    predict.add_argument("videos", metavar="VIDEO", nargs="+", help="video files")
    predict.add_argument(
        "--model-uri",
        metavar="URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model "
        "(default: models:/<mlflow.model_name>@champion of --config)",
    )
    predict.add_argument(
        "--top-k",
        metavar="K",
        type=int,
        default=5,
        help="classes to print per video (with --timeline: kept per window in --json)",
    )
    predict.add_argument(
        "--timeline",
        action="store_true",
        help="classify windows along each video and print its segments (runs of windows with the "
        "same top class: start-end in seconds, class, mean score)",
    )
    predict.add_argument(
        "--window-s",
        metavar="S",
        type=float,
        help="with --timeline: window length in seconds (default: one clip of the model)",
    )
    predict.add_argument(
        "--stride-s",
        metavar="S",
        type=float,
        help="with --timeline: seconds from one window's start to the next (default: --window-s)",
    )
    predict.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results as JSON: the top-k list, or with --timeline the timeline "
        "(an object for one video, a list for several) with every window and segment",
    )
    predict.add_argument(
        "--plot", metavar="PATH", help="with --timeline: draw the timelines as a PNG, one row per video"
    )
    predict.add_argument(
        "--max-windows",
        metavar="N",
        type=int,
        default=MAX_WINDOWS,
        help=f"with --timeline: windows per video at most (default {MAX_WINDOWS}); a longer "
        "timeline is refused before decoding",
    )
    predict.add_argument(
        "--max-clips",
        metavar="N",
        type=int,
        default=MAX_CLIPS,
        help=f"with --timeline: clips per video at most, over all its windows (default {MAX_CLIPS})",
    )
    infer = command(
        "infer",
        "Ray Data batch inference: score a folder, an s3:// prefix or a list of videos with a "
        "registered model into Parquet; re-running scores only what is new",
        handler=cmd_infer,
    )
    infer.add_argument(
        "--model-uri",
        metavar="URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model "
        "(default: models:/<mlflow.model_name>@champion)",
    )
    infer.add_argument(
        "--videos",
        metavar="DIR|s3://PREFIX|LIST",
        required=True,
        help="a folder or s3:// prefix (every video file under it), or a text file naming one video "
        "(path or s3:// URI) per line",
    )
    infer.add_argument(
        "--out",
        metavar="DIR|s3://PREFIX",
        required=True,
        help="where the Parquet results, manifests and quarantine.csv go (one model per --out, one "
        "run at a time); read the results with pipelines.infer_out.read_predictions",
    )
    infer.add_argument("--top-k", metavar="K", type=int, default=5, help="classes kept per video (and window)")
    infer.add_argument("--windows", action="store_true", help="also a timeline: top-k per window along each video")
    infer.add_argument("--window-s", metavar="S", type=float, help="window length in seconds (default: one clip)")
    infer.add_argument("--stride-s", metavar="S", type=float, help="seconds between windows (default: --window-s)")
    infer.add_argument(
        "--embeddings",
        action="store_true",
        help="also each video's embedding: the pooled features before the classifier, averaged over its test views",
    )
    infer.add_argument(
        "--max-windows",
        metavar="N",
        type=int,
        default=MAX_WINDOWS,
        help=f"with --windows: windows per video at most (default {MAX_WINDOWS}); a longer timeline "
        "is refused before decoding and its video committed as timeline_limit",
    )
    infer.add_argument(
        "--max-clips",
        metavar="N",
        type=int,
        default=MAX_CLIPS,
        help=f"with --windows: clips per video at most, over all its windows (default {MAX_CLIPS})",
    )
    export = command(
        "export",
        "a registered model as one TorchScript or ONNX graph (dynamic batch), checked "
        "against PyTorch; logged under export/ of the version's run, or written to --out",
        config="optional",
        handler=cmd_export,
    )
    export.add_argument(
        "--model-uri",
        metavar="URI",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION (or runs:/ID/model with --out)",
    )
    export.add_argument("--format", choices=["torchscript", "onnx"], required=True, help="graph format")
    export.add_argument("--out", metavar="PATH", help="write the file here instead of logging it to MLflow")
    status = command(
        "status", "the runs of this pipeline (newest first) and what each of their steps did", handler=cmd_status
    )
    status.add_argument("--run-id", metavar="ID", help="show only this run")
    status.add_argument("--all", action="store_true", help="every run, not only the last 10")

    for sub in (run, preprocess, train, evaluate, promote, infer):  # the commands that start Ray
        sub.add_argument(
            "--verbose",
            action="store_true",
            help="also show Ray's own INFO logs, Ray Train's reports and Ray Data's progress log",
        )

    bench = command(
        "bench",
        "benchmarks: model (params, FLOPs, speed), data (shard throughput), "
        "train (steps/s), ablate (the paper's ablations), infer (views/s of batch "
        "inference)",
        config=None,
        handler=cmd_bench,
    )
    bench.add_argument(
        "target", choices=["model", "data", "train", "ablate", "finetune", "infer"], help="which benchmark"
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script (see its --help)")
    return parser
