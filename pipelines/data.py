"""The data steps as the CLI and the workflow call them: synth (when asked), ingest, preprocess."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from . import ingest
from .config import PipelineConfig
from .storage import Storage, is_s3, s3_options


def storage_of(cfg: PipelineConfig) -> Storage:
    return Storage(cfg.storage_root, s3_options(cfg.s3))


def synthesize(
    out: str,
    classes: int,
    videos_per_class: int,
    seed: int,
    *,
    size: int = 96,
    seconds: float = 2.0,
    val_fraction: float = 0.25,
    log=print,
) -> dict:
    from slowfast.video.synth import write_dataset

    width = (size * 4 // 3) // 2 * 2  # Kinetics-like 4:3 landscape frames; even for yuv420p
    last = [0.0]

    def progress(done, total):
        if time.time() - last[0] > 5 or done == total:
            last[0] = time.time()
            log(f"  synth: {done}/{total} videos")

    summary = write_dataset(
        out,
        classes,
        videos_per_class,
        seed,
        width=width,
        height=size - size % 2,
        seconds=seconds,
        val_fraction=val_fraction,
        progress=progress,
    )
    log(
        f"synth: {sum(summary['videos'].values())} videos ({summary['videos']}) of {len(summary['classes'])} "
        f"classes in {summary['elapsed_s']:.1f}s -> {out}; annotations: {', '.join(summary['annotations'].values())}"
    )
    return summary


def ensure_videos(cfg: PipelineConfig, log=print) -> dict | None:
    """Generate the synthetic set into data.video_root when data.synth is set and the folder is empty."""
    synth = cfg.data.synth
    root = cfg.data.video_root
    if synth is None or is_s3(root) or (Path(root).is_dir() and any(Path(root).iterdir())):
        return None
    log(f"synth: {root} is empty; generating the synthetic motion dataset (data.synth)")
    return synthesize(
        root,
        synth.classes,
        synth.videos_per_class,
        synth.seed,
        size=synth.size,
        seconds=synth.seconds,
        val_fraction=synth.val_fraction,
        log=log,
    )


def run_ingest(cfg: PipelineConfig, log=print, retry_quarantined: frozenset[str] = frozenset()) -> ingest.Plan:
    ensure_videos(cfg, log)
    plan = ingest.plan(cfg, storage_of(cfg), retry_quarantined=retry_quarantined)
    for sp in plan.splits.values():
        q = sp.summary()["quarantined_at_plan"]
        log(
            f"ingest {sp.split}: {sp.rows_read} rows, {len(sp.todo)} to decode, {sp.done} already committed, "
            f"{len(sp.quarantined)} quarantined{' ' + str(q) if q else ''} (prep {sp.prep_hash})"
        )
    summary = plan.summary()
    if plan.layout:
        log(f"ingest: {cfg.data.video_root}: {plan.layout}")
    if summary.get("ignored"):
        log(f"ingest: passed over {summary['ignored']} (e.g. {', '.join(summary.get('ignored_examples', []))})")
    return plan


def run_preprocess(
    cfg: PipelineConfig,
    splits: list[str] | None = None,
    run_id: str | None = None,
    log=print,
    plan: ingest.Plan | None = None,
    retry_quarantined: frozenset[str] = frozenset(),
) -> dict:
    """Decode what `plan` (default: a fresh ingest, which plans the quarantined videos with a reason in
    `retry_quarantined` again) has to do; returns per-split summaries and the plan."""
    from .preprocess import preprocess_split
    from .ray_runtime import init_ray

    store = storage_of(cfg)
    store.check_writable()
    plan = plan or run_ingest(cfg, log, retry_quarantined)
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if any(sp.todo for sp in plan.splits.values()):
        init_ray(cfg)
    out = {"run_id": run_id, "classes": plan.classes, "plan": plan, "splits": {}}
    for split in splits or list(plan.splits):
        if split not in plan.splits:
            raise ValueError(f"--split {split}: not a configured split; the splits are {', '.join(plan.splits)}")
        s = preprocess_split(cfg, store, plan, split, run_id, log=log)
        out["splits"][split] = s
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["quarantine_reasons"].items())) or "none"
        log(
            f"preprocess {split}: {s['rows_read']} rows = {s['processed']} processed + {s['quarantined']} "
            f"quarantined ({reasons}){unread_note(s)}; decoded now {s['decoded_now']}, {s['clips']} clips, "
            f"{s['short_videos']} short videos, {s['wall_s']}s\n  shards:     {s['shards']}\n"
            f"  quarantine: {s['quarantine_report']}"
        )
    return out


def unread_note(split_summary: dict) -> str:
    """' + N unread (...)' when a storage fault left videos unread, else ''."""
    n = split_summary["unread"]
    if not n:
        return ""
    return f" + {n} unread, for the next run ({'; '.join(split_summary['unread_examples'])})"
