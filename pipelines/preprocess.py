"""Preprocess: Ray Data decodes videos with PyAV into pre-sampled dual-rate shards, then commits them.

Actors (a pool that starts with the CPUs the data nodes have now and grows, up to one per batch, as
nodes join: an autoscaling cluster sees the demand) each take a batch of videos, decode only the clip windows,
write one Parquet shard, and return one small record per video. The driver streams those records
and commits a manifest every few shards: a crash loses at most the uncommitted batches, and the
re-run decodes exactly those videos again (same seeds, same clips). A video's own faults are committed
as quarantined; a video the storage failed to deliver (after retries) is never committed: the step says
how many and why, fails unless preprocess.max_unread allows them, and the next run reads them.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict

import numpy as np

from slowfast.shards import manifest
from slowfast.shards.schema import ShardMeta, clips_to_table, encode_frames, write_shard
from slowfast.video.clips import ClipSampling, cut_clips
from slowfast.video.decode import DECODE_ERROR, VideoDecodeError, VideoReader

from .config import PipelineConfig
from .errors import PipelineError
from .ingest import Plan, SplitPlan, Task
from .storage import ReadFailed, Storage, VideoSource, s3_options

COMMIT_EVERY_SECONDS = 30.0


class PreprocessError(PipelineError, RuntimeError):
    """Preprocessing cannot go on (e.g. no CPU for its actors, videos left unread); what was decoded is committed."""


def shard_meta(cfg: PipelineConfig, plan: Plan, sp: SplitPlan) -> ShardMeta:
    p, m = cfg.preprocess, cfg.model
    return ShardMeta(
        dataset=cfg.data.dataset,
        split=sp.split,
        class_names=plan.classes,
        T=m.T,
        alpha=m.alpha,
        tau=m.tau,
        frames_per_clip=m.alpha * m.T,
        target_fps=p.target_fps,
        short_side=p.short_side,
        frame_format=p.frame_format,
        jpeg_quality=p.jpeg_quality,
        prep_hash=sp.prep_hash,
    )


def decode_video(
    src, task: Task, meta: ShardMeta, *, mode: str, num_clips: int, seed: int, max_pixels: int
) -> tuple[list[dict], bool]:
    """The clips of one video as shard rows, and whether it was shorter than one clip.

    Each distinct frame is encoded as it is decoded and only its bytes are kept: overlapping eval
    views share frames, which are encoded once, and no clip is ever stacked as a whole.
    """
    sampling = ClipSampling(
        T=meta.T,
        tau=meta.tau,
        alpha=meta.alpha,
        target_fps=meta.target_fps,
        short_side=meta.short_side,
        mode=mode,
        num_clips=num_clips,
        seed=seed,
    )
    jpeg = meta.frame_format == "jpeg"

    def encode(frame: np.ndarray) -> bytes:
        encoded = encode_frames(frame[None], meta.frame_format, meta.jpeg_quality)
        return encoded[0] if jpeg else encoded

    with VideoReader(src, name=task.rel, max_pixels=max_pixels, threads=1) as reader:
        clips = cut_clips(reader, sampling, video_id=task.video_id, encode=encode)
    slow = clips.slow_index.astype(np.int16).tolist()
    rows = []
    for i, plan in enumerate(clips.plans):
        # A list of one JPEG per frame, or the raw bytes of the whole (N, H, W, 3) clip.
        frames = clips.items(i) if jpeg else b"".join(clips.items(i))
        rows.append(
            {
                "video_id": task.video_id,
                "label": task.label,
                "clip_index": plan.clip_index,
                "start_sec": clips.start_sec(i),
                "height": clips.height,
                "width": clips.width,
                "frames": frames,
                "slow_index": slow,
            }
        )
    return rows, clips.short


class ClipWriter:
    """Ray Data actor: a batch of videos in, one shard written, one record per video out."""

    def __init__(
        self, store: Storage, source: VideoSource, meta_json: str, mode: str, num_clips: int, seed: int, max_pixels: int
    ):
        self.store, self.source = store, source
        self.meta = ShardMeta.model_validate_json(meta_json)
        self.mode, self.num_clips, self.seed, self.max_pixels = mode, num_clips, seed, max_pixels
        self.folder = manifest.shard_dir(self.meta.dataset, self.meta.split, self.meta.prep_hash)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows, records, unread = [], [], []
        for i in range(len(batch["video_id"])):
            task = Task(
                **{
                    k: batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]
                    for k in ("video_id", "label", "rel", "size", "etag")
                }
            )
            record = manifest.VideoRecord(task.video_id, task.rel, task.size, task.etag, label=task.label)
            why_unread = ""
            try:
                clips, short = decode_video(
                    self.source.open(task.rel),
                    task,
                    self.meta,
                    mode=self.mode,
                    num_clips=self.num_clips,
                    seed=self.seed,
                    max_pixels=self.max_pixels,
                )
            except VideoDecodeError as exc:  # the video's own fault: quarantined with its reason
                record.reason, record.detail = exc.reason, exc.detail
            except ReadFailed as exc:  # the storage's, after its retries: left for the next run
                why_unread = exc.detail
            except (OSError, MemoryError) as exc:  # a local disk's I/O error, this worker's memory: not the video's
                why_unread = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - its bytes were read and broke the decoder in a way it does not
                # name: the video's doing, or a bug it triggers. Quarantined (a bug must not stop every later run),
                # with what happened; `--retry-quarantined decode_error` decodes it again after a fix.
                record.reason, record.detail = DECODE_ERROR, f"unexpected {type(exc).__name__}: {exc}"
            else:
                rows.extend(clips)
                record.clips, record.short = len(clips), short
            records.append(record)
            unread.append(why_unread)
        shard = {"path": "", "rows": 0, "bytes": 0, "videos": []}
        if rows:
            rel = f"{self.folder}/part-{uuid.uuid4().hex}.parquet"
            written = write_shard(clips_to_table(rows, self.meta), self.store.path(rel), filesystem=self.store.fs)
            held = [
                r for r, why in zip(records, unread, strict=True) if not r.quarantined and not why
            ]  # the videos it holds
            shard = {
                "path": rel,
                "rows": written["rows"],
                "bytes": written["bytes"],
                "videos": sorted({r.video_id for r in held}),
            }
            for r in held:
                r.shard = rel
        return {
            "record": [json.dumps(asdict(r)) for r in records],
            "shard": [json.dumps(shard)] * len(records),
            "unread": unread,
        }


def _ray_data_run(cfg: PipelineConfig, store: Storage, sp: SplitPlan, meta: ShardMeta):
    """Stream (record, shard, why unread: "" when read) back from the actor pool."""
    import ray
    from ray.data import ActorPoolStrategy

    p = cfg.preprocess
    num_clips = p.clips_per_video if sp.mode == "train" else p.eval_views
    videos_per_shard = max(1, p.rows_per_shard // num_clips)
    batches = -(-len(sp.todo) // videos_per_shard)
    from .ray_runtime import data_nodes

    # Start with the CPUs the data nodes have now; grow (to one actor per batch) as nodes join.
    initial = max(1, min(data_node_cpus(cfg), batches))
    source = VideoSource(cfg.data.video_root, s3_options(cfg.s3))
    tasks = list(sp.todo)
    if sp.mode == "train":
        # Annotation files are sorted by class; shuffled (seeded) so every shard mixes classes and
        # training can stream shards without a huge shuffle buffer.
        random.Random(p.seed).shuffle(tasks)
    ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=batches)
    ds = ds.map_batches(
        ClipWriter,
        batch_size=videos_per_shard,
        batch_format="numpy",
        num_cpus=1,
        **data_nodes(cfg),
        compute=ActorPoolStrategy(min_size=1, max_size=batches, initial_size=initial),
        fn_constructor_kwargs=dict(
            store=store,
            source=source,
            meta_json=meta.model_dump_json(),
            mode=sp.mode,
            num_clips=num_clips,
            seed=p.seed,
            max_pixels=p.max_frame_pixels,
        ),
    )
    for row in ds.iter_rows():
        yield manifest.VideoRecord(**json.loads(row["record"])), json.loads(row["shard"]), row["unread"]


def data_node_cpus(cfg: PipelineConfig) -> int:
    """CPUs of the live nodes that may run Ray Data's work (those with ray.data_nodes' labels)."""
    import ray

    want = cfg.ray.data_nodes.items()
    return int(
        sum(
            n.get("Resources", {}).get("CPU", 0)
            for n in ray.nodes()
            if n.get("Alive") and all(n.get("Labels", {}).get(k) == v for k, v in want)
        )
    )


def preprocess_split(cfg: PipelineConfig, store: Storage, plan: Plan, split: str, run_id: str, log=print) -> dict:
    sp = plan.splits[split]
    folder = manifest.manifest_dir(cfg.data.dataset, split, sp.prep_hash)
    meta = shard_meta(cfg, plan, sp)
    started = time.time()
    decoded: Counter = Counter()
    unread: dict[str, str] = {}  # video id -> "path: why the storage did not deliver it"
    pending_videos: list[manifest.VideoRecord] = []
    pending_shards: dict[str, dict] = {}
    last_commit = time.time()

    def flush():
        nonlocal last_commit
        if pending_videos:
            manifest.commit(store, folder, run_id, list(pending_videos), list(pending_shards.values()))
            pending_videos.clear()
            pending_shards.clear()
        last_commit = time.time()

    if sp.todo:
        from .ray_runtime import stops_when_stalled

        try:
            with stops_when_stalled(cfg, "preprocess's decode actors", PreprocessError):
                for record, shard, why_unread in _ray_data_run(cfg, store, sp, meta):
                    if why_unread:
                        unread[record.video_id] = f"{record.source}: {why_unread}"
                    else:
                        pending_videos.append(record)
                        decoded["quarantined" if record.quarantined else "processed"] += 1
                        decoded["clips"] += record.clips
                    if shard["path"]:
                        pending_shards[shard["path"]] = shard
                    done = decoded["processed"] + decoded["quarantined"] + len(unread)
                    due = time.time() - last_commit > COMMIT_EVERY_SECONDS
                    if len(pending_shards) >= cfg.preprocess.commit_every or due:
                        flush()
                        log(f"  {split}: {done}/{len(sp.todo)} videos decoded, {decoded['clips']} clips committed")
        finally:
            flush()  # a record arrives with its shard written: what came back is kept, whatever stopped the run
    state = manifest.DatasetState.load(store, folder)
    report = write_quarantine_report(store, folder, sp, state)
    # An unread video may still have an older record (its file changed since): it counts as unread until read.
    counted = sp.annotated_ids - unread.keys()
    reasons = Counter(v.reason for v in state.videos.values() if v.quarantined and v.video_id in counted)
    reasons.update(q.reason for q in sp.quarantined)
    processed = sum(1 for v in state.videos.values() if not v.quarantined and v.video_id in counted)
    summary = {
        "split": split,
        "mode": sp.mode,
        "prep_hash": sp.prep_hash,
        "rows_read": sp.rows_read,
        "decoded_now": decoded["processed"] + decoded["quarantined"],
        "already_committed": sp.done,
        "processed": processed,
        "quarantined": sum(reasons.values()),
        "quarantine_reasons": dict(reasons),
        "unread": len(unread),
        "unread_examples": list(unread.values())[:3],
        "clips": sum(v.clips for v in state.videos.values() if v.video_id in counted and not v.quarantined),
        "short_videos": sum(1 for v in state.videos.values() if v.short and v.video_id in counted),
        "shards": store.uri(manifest.shard_dir(cfg.data.dataset, split, sp.prep_hash)),
        "manifests": store.uri(folder),
        "quarantine_report": report,
        "wall_s": round(time.time() - started, 2),
    }
    if summary["processed"] + summary["quarantined"] + summary["unread"] != summary["rows_read"]:
        raise PreprocessError(
            f"{split}: accounting broke: {summary['processed']} processed + "
            f"{summary['quarantined']} quarantined + {summary['unread']} unread != "
            f"{summary['rows_read']} rows read; this is a bug: please report it with "
            f"{summary['manifests']}"
        )
    if len(unread) > cfg.preprocess.max_unread:
        raise PreprocessError(
            f"{split}: {len(unread)} of {len(sp.todo)} videos not read: the storage failed to deliver them after "
            f"retries ({'; '.join(summary['unread_examples'])}). Nothing was committed for them; run the same "
            f"command again to read them (preprocess.max_unread: {cfg.preprocess.max_unread} allowed)"
        )
    return summary


def write_quarantine_report(store: Storage, folder: str, sp: SplitPlan, state: manifest.DatasetState) -> str:
    """video_id, path, reason, detail for every quarantined row of this split, as CSV."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["video_id", "path", "reason", "detail"])
    for rec in sorted(state.videos.values(), key=lambda r: r.video_id):
        if rec.quarantined and rec.video_id in sp.annotated_ids:
            writer.writerow([rec.video_id, rec.source, rec.reason, rec.detail])
    for rec in sp.quarantined:
        writer.writerow([rec.video_id, rec.source, rec.reason, rec.detail])
    store.write_bytes(f"{folder}/quarantine.csv", out.getvalue().encode())
    return store.uri(f"{folder}/quarantine.csv")
