"""Batch inference on Ray Data: score a folder, an s3:// prefix or a list of videos with a registered model.

CPU tasks open each video and cut its test views (and a timeline's windows) through the one clip path
(`ClipSpec.cut_views`); an actor pool (a GPU per actor, or CPUs) runs the network and aggregates each
video's views; the driver writes Parquet parts and commits a manifest at least every `infer.commit_every_s`.

Exactly once, as a reader sees it: `read_predictions` / `read_windows` return each video's latest committed row,
one per video, at any moment (a run going on, a crashed one, videos scored again). A re-run into the same --out
scores exactly the videos with no current committed record (new, changed, not committed by an interrupted run,
or not read), deletes the parts no manifest names, and rewrites the parts holding superseded rows. One run at a
time holds --out (`RunLock`). A video's own faults are committed with preprocess's reasons (quarantine.csv) and
not retried until the file changes; a video the storage failed to deliver, or whose cut failed unexpectedly, is
not committed: it is counted as unread, the run fails past `infer.max_unread`, and the next run scores it.

--out holds, per committed batch `part-<id>`: predictions/part-<id>.parquet (video, labels, scores, views,
embedding if asked) and windows/part-<id>.parquet (one row per timeline window, if asked); the manifests/
commit log; lock/ (the run writing there); quarantine.csv; infer.json (the model and options the folder's
results come from: another model or other options need another --out).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from slowfast.serving import ClipSpec, VideoClassifier, window_probabilities
from slowfast.shards import manifest
from slowfast.video.clips import positive_seconds
from slowfast.video.decode import VideoDecodeError

from . import tracking
from .config import InferSection, PipelineConfig
from .errors import PipelineError
from .ingest import MISSING_FILE, ZERO_BYTES, video_paths
from .storage import (_NOT_FOUND, ReadFailed, S3Options, Storage, StorageError, VideoSource, is_s3, s3_options,
                      split_s3)

MANIFESTS, PREDICTIONS, WINDOWS, LOCKS = "manifests", "predictions", "windows", "lock"
DECODE_RETRIES = 3
# Why a video was not read: not its fault, so never committed (the next run scores it), unlike a quarantine reason.
READ_FAILED = "read_failed"  # the storage did not deliver it (after its retries), or a HEAD of it failed
UNEXPECTED = "unexpected_error"  # its cut raised something else than VideoDecodeError: a bug, an infrastructure fault
UNREAD = (READ_FAILED, UNEXPECTED)
LOCK_HEARTBEAT_S = 30.0  # a run rewrites its lock this often, and before each commit
LOCK_STALE_S = 600.0  # a lock not rewritten for this long is a dead run's (the hosts' clocks agreeing within a minute)
READ_TRIES = 5  # a reader starts over when a part it was to read has been compacted away


class InferError(PipelineError, ValueError):
    """Inference that cannot start or finish: names the input (model, videos, --out) and the fix."""


@dataclass(frozen=True)
class Job:
    """What to compute per video."""

    top_k: int = 5
    windows: bool = False  # per-window rows along each video (a timeline)
    window_s: float | None = None  # None: one clip's span
    stride_s: float | None = None  # None: window_s
    embeddings: bool = False  # the pooled features before the classifier, averaged over the test views

    def check(self) -> None:
        if self.top_k < 1:
            raise InferError(f"--top-k {self.top_k}: must be 1 or more")
        for flag, value in (("--window-s", self.window_s), ("--stride-s", self.stride_s)):
            if value is not None and not positive_seconds(value):
                raise InferError(f"{flag} {value}: must be a positive number of seconds")
            if value is not None and not self.windows:
                raise InferError(f"{flag} is for timeline windows: add --windows")


@dataclass(frozen=True)
class VideoTask:
    """One video to score: `video` is how results name it (its URI), `root` + `rel` how it is opened."""

    video: str
    root: str
    rel: str
    size: int
    etag: str


class Unscored(NamedTuple):
    """A listed video that is not scored: `reason` a quarantine reason (committed) or one of UNREAD (not)."""

    video: str
    reason: str
    detail: str


# --- listing -------------------------------------------------------------------------------------

def list_videos(videos: str, s3: S3Options) -> tuple[list[VideoTask], list[Unscored]]:
    """The videos --videos names (a folder, an s3:// prefix, or a text file listing one video per line),
    and those that cannot be scored: missing, empty, not a video file, or not checked (a failed HEAD)."""
    if not is_s3(videos) and Path(videos).is_file():
        return _list_file(Path(videos), s3)
    source = VideoSource(videos, s3)
    files = source.list()
    found, ignored = video_paths(files)
    tasks, bad = [], []
    for parts in found:
        f = files["/".join(parts)]
        task = VideoTask(source.uri(f.rel), source.root, f.rel, f.size, f.etag)
        (bad.append(Unscored(task.video, ZERO_BYTES, "the file is empty")) if f.size == 0 else tasks.append(task))
    if not tasks and not bad:
        raise InferError(f"--videos {videos}: no video files there ({len(ignored)} other files); give a folder or "
                         "s3:// prefix holding videos, or a text file listing them")
    return tasks, bad


def _list_file(path: Path, s3: S3Options) -> tuple[list[VideoTask], list[Unscored]]:
    """A list file: one video per line, a local path (relative to the list's folder) or s3://bucket/key;
    blank lines and lines starting with # are skipped."""
    tasks, bad, seen = [], [], set()
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#") or entry in seen:
            continue
        seen.add(entry)
        if is_s3(entry):
            found = _head(entry, s3)
        else:
            file = Path(entry) if os.path.isabs(entry) else path.parent / entry
            if file.is_file():
                st = file.stat()
                found = VideoTask(entry, str(file.parent), file.name, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
            else:
                found = Unscored(entry, MISSING_FILE, f"no file {file}")
        if isinstance(found, VideoTask) and found.size == 0:
            found = Unscored(entry, ZERO_BYTES, "the file is empty")
        (bad if isinstance(found, Unscored) else tasks).append(found)
    if not tasks and not bad:
        raise InferError(f"--videos {path}: the list names no video (one path or s3:// URI per line)")
    return tasks, bad


def _head(uri: str, s3: S3Options) -> VideoTask | Unscored:
    """An s3:// object as a task, from its HEAD; a 404 is the video's fault (missing_file), any other failure (no
    connection, 5xx after botocore's retries, credentials) the storage's: unread, not committed."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    source = VideoSource(f"s3://{bucket}", s3)
    try:
        head = source.client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _NOT_FOUND:
            return Unscored(uri, MISSING_FILE, "no such object")
        return Unscored(uri, READ_FAILED, f"HEAD: {code or type(exc).__name__}: {exc}")
    except BotoCoreError as exc:
        return Unscored(uri, READ_FAILED, f"HEAD: {type(exc).__name__}: {exc}")
    return VideoTask(uri, f"s3://{bucket}", key, head["ContentLength"], head["ETag"].strip('"'))


def local_inputs(videos: str, tasks: list[VideoTask], bad: list[Unscored]) -> dict[str, str]:
    """What of --videos the decode tasks would read from a local disk, as `init_ray(shared=...)` checks that every
    node of a cluster sees it: a folder, or the local files a list file names (its s3:// entries are read anywhere)."""
    if is_s3(videos):
        return {}
    if not Path(videos).is_file():
        return {"--videos": videos}
    local = [os.path.join(t.root, t.rel) for t in tasks if not is_s3(t.root)] + \
            [b.video for b in bad if not is_s3(b.video)]
    if not local:
        return {}
    return {f"--videos {videos} names {len(local)} local file{'s' * (len(local) != 1)}, e.g.": local[0]}


# --- the Ray Data stages -------------------------------------------------------------------------

def cut_views(batch: dict, spec: dict, job: dict, s3: S3Options) -> dict:
    """Ray Data task (decode tasks scale with the CPUs, unlike a fixed actor pool): videos in, their views out
    (fast frames as raw uint8 bytes plus shape), or why not: a quarantine reason, or one of UNREAD."""
    spec, job = ClipSpec(**spec), Job(**job)
    out = {k: [] for k in ("video", "size", "etag", "views", "shape", "slow_index", "test_views", "windows",
                           "reason", "detail", "cut_cpu_s")}
    for i in range(len(batch["video"])):
        task = VideoTask(**{k: _scalar(batch[k][i]) for k in ("video", "root", "rel", "size", "etag")})
        # "" rather than None: a column of nulls does not come back from Arrow as strings
        fast, slow, test_views, windows, reason, detail = None, None, 0, [], "", ""
        started = time.process_time()  # the codec's threads included
        try:
            fast, slow, test_views, windows = _cut(VideoSource(task.root, s3), task, spec, job)
        except VideoDecodeError as exc:  # the video's own fault: quarantined
            reason, detail = exc.reason, exc.detail
        except ReadFailed as exc:  # the storage's, after its retries: read again by the next run
            reason, detail = READ_FAILED, exc.detail
        except Exception as exc:  # noqa: BLE001 - neither the video's known fault nor the storage's: not committed
            reason, detail = UNEXPECTED, f"{type(exc).__name__}: {exc}"
        out["video"].append(task.video)
        out["size"].append(task.size)
        out["etag"].append(task.etag)
        out["views"].append(b"" if fast is None else fast.tobytes())
        out["shape"].append([] if fast is None else list(fast.shape))
        out["slow_index"].append([] if slow is None else slow.tolist())
        out["test_views"].append(test_views)
        out["windows"].append(json.dumps(windows))
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["cut_cpu_s"].append(time.process_time() - started)
    return out


def _cut(source: VideoSource, task: VideoTask, spec: ClipSpec, job: Job):
    """The test views, then (with a timeline) every window's, cut in one pass over the video."""
    fast, slow, test_views, found = spec.cut_timeline(source.open(task.rel), task.video, windows=job.windows,
                                                      window_s=job.window_s, stride_s=job.stride_s)
    windows = [{"start_s": w.start_s, "end_s": w.end_s, "clips": len(w.plans)} for w in found]
    return fast, slow, test_views, windows


class Score:
    """Ray Data actor: a batch of videos' views in, per video its top-k (and embedding, windows) out."""

    def __init__(self, model: list, job: dict, use_gpu: bool, threads: int, mixed_precision: bool):
        net, packed = unpack_model(model, threads)
        self.classifier = VideoClassifier(net, packed["class_names"], ClipSpec(**packed["spec"]),
                                          device="cuda" if use_gpu else "cpu", batch_views=packed["batch_views"],
                                          mixed_precision=mixed_precision)
        self.job = Job(**job)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("video", "size", "etag", "reason", "detail", "views", "labels", "scores", "embedding",
                               "windows", "cut_cpu_s", "score_cpu_s")}
        for i in range(len(batch["video"])):
            reason = _scalar(batch["reason"][i])
            row = {"video": _scalar(batch["video"][i]), "size": int(batch["size"][i]), "etag": _scalar(batch["etag"][i]),
                   "reason": reason, "detail": _scalar(batch["detail"][i]), "views": 0, "labels": "[]",
                   "scores": "[]", "embedding": b"", "windows": "[]", "cut_cpu_s": float(batch["cut_cpu_s"][i]),
                   "score_cpu_s": 0.0}
            if not reason:
                started = time.process_time()  # torch's threads included
                row.update(self.score(batch, i))
                row["score_cpu_s"] = time.process_time() - started
            for k, v in row.items():
                out[k].append(v)
        return out

    def score(self, batch: dict, i: int) -> dict:
        c, job = self.classifier, self.job
        # A writable copy: torch refuses to wrap read-only memory without a warning.
        fast = np.frombuffer(batch["views"][i], np.uint8).reshape([int(n) for n in batch["shape"][i]]).copy()
        slow = np.array(batch["slow_index"][i], np.int64)
        n = int(batch["test_views"][i])
        probs, feats = c.score(fast, slow, features=job.embeddings)
        top = c.top(probs[:n].astype(np.float64).mean(0), job.top_k)
        row = {"views": n, "labels": json.dumps(top["labels"]), "scores": json.dumps(top["scores"])}
        if job.embeddings:
            row["embedding"] = feats[:n].mean(0).astype(np.float32).tobytes()
        windows = json.loads(_scalar(batch["windows"][i]))
        if windows:
            per_window = window_probabilities(probs[n:], [w["clips"] for w in windows], c.spec.spatial_crops)
            row["windows"] = json.dumps([{"start_s": round(w["start_s"], 3), "end_s": round(w["end_s"], 3),
                                          **c.top(p, job.top_k)} for w, p in zip(windows, per_window)])
        return row


def pack_model(net: torch.nn.Module, **extra) -> dict:
    """A network as actors rebuild it (`unpack_model`): its config and CPU weights, plus `extra`."""
    return {"config": net.cfg.model_dump(), "state": {k: v.cpu() for k, v in net.state_dict().items()}, **extra}


def unpack_model(ref: list, threads: int):
    """In an actor: the network of a `pack_model` dict put in the object store (passed as [ref], so that
    Ray hands the reference over rather than resolving it), with `threads` torch threads."""
    import ray

    from slowfast.model import SlowFast, SlowFastConfig

    torch.set_num_threads(threads)
    packed = ray.get(ref[0])
    net = SlowFast(SlowFastConfig.model_validate(packed["config"]))
    net.load_state_dict(packed["state"])
    return net, packed


def decode_tasks(ds, fn, cfg: PipelineConfig, fn_kwargs: dict):
    """ds.map_batches(fn) as decode tasks, one item a call: infer.decode_cpus each, on the data nodes, retried
    DECODE_RETRIES times (a video that kills its worker is not retried forever). Ray 2.60 warns that
    map_batches' extra remote args are deprecated, yet names no parameter for a task's retries: the limit is
    passed, the warning not shown to users."""
    import warnings

    from .ray_runtime import data_nodes

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, batch_size=1, batch_format="numpy", num_cpus=cfg.infer.decode_cpus,
                              max_retries=DECODE_RETRIES, fn_kwargs=fn_kwargs, **data_nodes(cfg))


def scoring_actors(cfg: PipelineConfig) -> dict:
    """map_batches arguments of a scoring actor pool: CPUs or a GPU per actor, as many as `pool_size`
    (the pool grows while videos wait, and an autoscaler sees the demand), on the train nodes."""
    from ray.data import ActorPoolStrategy

    from .ray_runtime import train_nodes

    return dict(num_cpus=cfg.infer.cpus_per_worker, num_gpus=1 if cfg.infer.use_gpu else 0,
                compute=ActorPoolStrategy(min_size=1, max_size=pool_size(cfg.infer)), **train_nodes(cfg))


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


# --- the driver ----------------------------------------------------------------------------------

def identity(loaded: VideoClassifier, job: Job, model_uri: str) -> dict:
    """What an --out folder's results come from: the weights (by digest, whatever the URI said), the
    classes, the views and the job."""
    digest = hashlib.sha256()
    for key, value in sorted(loaded.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {"model_uri": model_uri, "weights_sha256": digest.hexdigest(), "class_names": loaded.class_names,
            "spec": asdict(loaded.spec), "job": asdict(job)}


def check_out(out: Storage, ident: dict) -> None:
    """An --out folder holds the results of one model and job: refuse to mix in others."""
    if not out.exists("infer.json"):
        out.write_bytes("infer.json", json.dumps(ident, indent=1).encode())
        return
    held = json.loads(out.read_bytes("infer.json"))
    differ = [k for k in ("weights_sha256", "class_names", "spec", "job") if held.get(k) != ident[k]]
    if differ:
        raise InferError(f"--out {out.uri()}: holds results of {held.get('model_uri')} with other "
                         f"{', '.join(differ)} than this run ({ident['model_uri']}); give another --out "
                         "(or delete that folder to start over)")


def drop_uncommitted(out: Storage, state: manifest.DatasetState) -> int:
    """Delete the parts that no manifest names (an interrupted run's: the lock is held, no other run writes), and
    those a compaction retired but did not get to delete; returns how many."""
    dropped = 0
    for folder in (PREDICTIONS, WINDOWS):
        for rel in out.list(folder, suffix=".parquet"):
            if state.shards.get(posixpath.basename(rel).removesuffix(".parquet"), {}).get("rows", 0) == 0:
                out.delete(rel)
                dropped += 1
    return dropped


def pool_size(cfg: InferSection) -> int:
    """Scoring actors at most: infer.workers, else what the cluster has room for."""
    import ray

    if cfg.workers:
        return cfg.workers
    resources = ray.cluster_resources()
    if cfg.use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise InferError("infer.use_gpu is set but the cluster has no GPU; set infer.use_gpu=false")
        return gpus
    return max(1, int(resources.get("CPU", 1) // (cfg.cpus_per_worker + cfg.decode_cpus)))


def run_infer(cfg: PipelineConfig, model_uri: str, videos: str, out_uri: str, job: Job, log=print) -> dict:
    """Score every video --videos names that --out has no current committed result for; returns the summary
    (also written to --out/summary.json). Raises InferError, after committing everything else, when more than
    infer.max_unread videos could not be read."""
    job.check()
    out = Storage(out_uri, s3_options(cfg.s3))
    try:
        out.check_writable("--out")
    except StorageError as exc:
        raise InferError(str(exc)) from None
    lock = RunLock(out, uuid.uuid4().hex[:12])
    taken = lock.acquire()
    if taken:
        log(f"infer: took over the lock of run {taken['run_id']} ({holder(taken)}), which is dead")
    try:
        summary = _infer(cfg, model_uri, videos, job, out=out, lock=lock, log=log)
    finally:
        lock.release()
    n = summary["unread_now"]
    if n > cfg.infer.max_unread:
        why = ", ".join(f"{k} {v}" for k, v in summary["unread_reasons"].items())
        raise InferError(f"{n} video{'s' * (n != 1)} not read ({why}; e.g. {summary['unread_examples'][0]}): "
                         f"nothing was committed for them, everything else was; run the same command again to score "
                         f"them (infer.max_unread: {cfg.infer.max_unread} allowed)")
    return summary


def _infer(cfg: PipelineConfig, model_uri: str, videos: str, job: Job, *, out: Storage, lock: RunLock, log) -> dict:
    """run_infer's work, with the lock held."""
    import ray

    from .ray_runtime import init_ray, joins_cluster, stops_when_stalled

    started = time.time()
    out.makedirs(PREDICTIONS)
    out.makedirs(WINDOWS)
    try:
        loaded = tracking.load_registered(cfg, model_uri)
    except tracking.TrackingError as exc:
        raise InferError(f"--model-uri {model_uri}: {exc}") from None
    ident = identity(loaded, job, model_uri)
    check_out(out, ident)
    try:
        tasks, bad = list_videos(videos, out.s3)
    except StorageError as exc:
        raise InferError(f"--videos {videos}: {exc}") from None
    state = manifest.DatasetState.load(out, MANIFESTS)
    dropped = drop_uncommitted(out, state)
    todo = [t for t in tasks if not state.is_current(t.video, t.size, t.etag)]
    bad = [b for b in bad if b.reason in UNREAD or b.video not in state.videos]
    unchecked = sum(b.reason in UNREAD for b in bad)
    log(f"infer: {len(tasks) + len(bad)} videos listed in {videos}: {len(todo)} to score, "
        f"{len(tasks) - len(todo)} already scored in {out.uri()}"
        + (f", {len(bad) - unchecked} unreadable" if len(bad) > unchecked else "")
        + (f", {unchecked} not checked (a failed HEAD)" if unchecked else "")
        + (f" ({dropped} uncommitted files of an interrupted run removed)" if dropped else ""))
    if todo or (bad and joins_cluster(cfg)):
        # Before anything is committed: the decode tasks open the videos on whichever node they run, so what of
        # --videos is local must be on every node.
        init_ray(cfg, shared=local_inputs(videos, tasks, bad))
    writer = Writer(out, job, lock, every_s=cfg.infer.commit_every_s, log=log, total=len(todo) + len(bad))
    if bad:
        writer.add([{"video": b.video, "size": 0, "etag": "", "reason": b.reason, "detail": b.detail, "views": 0}
                    for b in bad])
    if todo:
        workers = pool_size(cfg.infer)
        packed = pack_model(loaded.model, class_names=loaded.class_names, spec=asdict(loaded.spec),
                            batch_views=loaded.spec.views)
        threads = max(1, math.ceil(cfg.infer.cpus_per_worker))
        log(f"infer: {workers} scoring actor(s) ({'1 GPU' if cfg.infer.use_gpu else f'{cfg.infer.cpus_per_worker:g} CPU'}"
            f" each), decode tasks of {cfg.infer.decode_cpus:g} CPU")
        ds = ray.data.from_items([asdict(t) for t in todo], override_num_blocks=len(todo))
        # Decode tasks retry on their own (a lost worker's video is cut again); their remote args differ
        # from the actors', which also keeps Ray Data from fusing decoding into the scoring actors: tasks
        # scale with the CPUs, the pool with the workers, and a GPU actor never waits on PyAV.
        ds = decode_tasks(ds, cut_views, cfg, fn_kwargs=dict(spec=asdict(loaded.spec), job=asdict(job), s3=out.s3))
        ds = ds.map_batches(Score, batch_size=cfg.infer.batch_videos, batch_format="numpy", **scoring_actors(cfg),
                            fn_constructor_kwargs=dict(model=[ray.put(packed)], job=asdict(job),
                                                       use_gpu=cfg.infer.use_gpu, threads=threads,
                                                       mixed_precision=cfg.infer.mixed_precision))
        with stops_when_stalled(cfg, "infer's decode tasks and scoring actors", InferError):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add([{k: _scalar(batch[k][i]) for k in batch} for i in range(len(batch["video"]))])
    writer.flush()
    compacted = compact(out, manifest.DatasetState.load(out, MANIFESTS), job, lock)
    state = manifest.DatasetState.load(out, MANIFESTS)
    report = write_quarantine(out, state)
    scored = sum(1 for v in state.videos.values() if not v.quarantined)
    wall = time.time() - started
    unread = writer.unread
    summary = {"model_uri": model_uri, "videos": videos, "out": out.uri(), "listed": len(tasks) + len(bad),
               "scored_now": writer.scored, "quarantined_now": writer.quarantined, "unread_now": len(unread),
               "unread_reasons": dict(Counter(r["reason"] for r in unread)),
               "unread_examples": [f"{r['video']}: {r['reason']}: {r['detail']}" for r in unread[:3]],
               "scored_total": scored, "quarantined_total": len(state.videos) - scored, "views_now": writer.views,
               "parts_compacted": compacted,
               "cut_cpu_s": round(writer.cpu_s["cut"], 3), "score_cpu_s": round(writer.cpu_s["score"], 3),
               "wall_s": round(wall, 2), "videos_per_s": round(writer.scored / wall, 3) if writer.scored else 0.0,
               "quarantine_report": report, "predictions": out.uri(PREDICTIONS),
               "windows": out.uri(WINDOWS) if job.windows else None}
    out.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


class Writer:
    """The driver's end: results into Parquet parts, committed with a manifest every so often; unread videos
    are counted, never committed."""

    def __init__(self, out: Storage, job: Job, lock: RunLock, *, every_s: float, log, total: int):
        self.out, self.job, self.lock, self.every_s, self.log, self.total = out, job, lock, every_s, log, total
        self.pending: list[dict] = []
        self.unread: list[dict] = []
        self.last = time.time()
        self.scored = self.quarantined = self.views = 0
        self.cpu_s = {"cut": 0.0, "score": 0.0}  # CPU seconds the decode tasks and scoring actors spent

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            (self.unread if row["reason"] in UNREAD else self.pending).append(row)
        if time.time() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = f"part-{uuid.uuid4().hex}"
        good = [r for r in self.pending if not r["reason"]]
        if good:
            pq.write_table(predictions_table(good, self.job), self.out.path(PREDICTIONS, f"{part}.parquet"),
                           filesystem=self.out.fs)
            if self.job.windows:
                pq.write_table(windows_table(good), self.out.path(WINDOWS, f"{part}.parquet"), filesystem=self.out.fs)
        records = [manifest.VideoRecord(r["video"], r["video"], int(r["size"]), r["etag"],
                                        shard=None if r["reason"] else part, clips=int(r["views"]),
                                        reason=r["reason"] or None, detail=r["detail"] or None) for r in self.pending]
        self.lock.refresh()  # still ours: a run taken over (it looked dead) commits nothing more
        manifest.commit(self.out, MANIFESTS, self.lock.run_id, records,
                        [{"path": part, "rows": len(good)}] if good else [])
        self.scored += len(good)
        self.quarantined += len(self.pending) - len(good)
        self.views += sum(int(r["views"]) for r in good)
        for step in self.cpu_s:
            self.cpu_s[step] += sum(float(r.get(f"{step}_cpu_s", 0.0)) for r in self.pending)
        self.pending.clear()
        self.last = time.time()
        self.log(f"  infer: {self.scored + self.quarantined}/{self.total} videos committed "
                 f"({self.quarantined} unreadable" + (f", {len(self.unread)} not read" if self.unread else "") + ")")


def predictions_table(rows: list[dict], job: Job) -> pa.Table:
    columns = {"video": pa.array([r["video"] for r in rows], pa.string()),
               "labels": pa.array([json.loads(r["labels"]) for r in rows], pa.list_(pa.string())),
               "scores": pa.array([json.loads(r["scores"]) for r in rows], pa.list_(pa.float32())),
               "views": pa.array([int(r["views"]) for r in rows], pa.int32())}
    if job.embeddings:
        flat = np.concatenate([np.frombuffer(r["embedding"], np.float32) for r in rows])
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), len(flat) // len(rows))
    return pa.table(columns)


def windows_table(rows: list[dict]) -> pa.Table:
    flat = [(r["video"], k, w) for r in rows for k, w in enumerate(json.loads(r["windows"]))]
    return pa.table({"video": pa.array([v for v, _, _ in flat], pa.string()),
                     "window": pa.array([k for _, k, _ in flat], pa.int32()),
                     "start_s": pa.array([w["start_s"] for _, _, w in flat], pa.float64()),
                     "end_s": pa.array([w["end_s"] for _, _, w in flat], pa.float64()),
                     "labels": pa.array([w["labels"] for _, _, w in flat], pa.list_(pa.string())),
                     "scores": pa.array([w["scores"] for _, _, w in flat], pa.list_(pa.float32()))})


def write_quarantine(out: Storage, state: manifest.DatasetState) -> str:
    """video, reason, detail of every video committed as unreadable, as CSV."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["video", "reason", "detail"])
    for rec in sorted(state.videos.values(), key=lambda r: r.video_id):
        if rec.quarantined:
            writer.writerow([rec.video_id, rec.reason, rec.detail])
    out.write_bytes("quarantine.csv", text.getvalue().encode())
    return out.uri("quarantine.csv")


def current_parts(state: manifest.DatasetState) -> dict[str, set[str]]:
    """part -> the videos whose latest committed record is a score in it."""
    parts: dict[str, set[str]] = {}
    for video, rec in state.videos.items():
        if rec.shard and not rec.quarantined:
            parts.setdefault(rec.shard, set()).add(video)
    return parts


def compact(out: Storage, state: manifest.DatasetState, job: Job, lock: RunLock) -> int:
    """Retire the committed parts that hold rows no longer a video's latest (scored again since, or quarantined
    after its file changed), so that predictions/ read as a plain Parquet folder holds one row per video once a run
    has ended. Parts never change in place: their current rows go to one new part, a commit points those videos
    there and retires the old parts (rows 0), then their files are deleted (a crash before: the next run's
    `drop_uncommitted` deletes them). A reader still on the older state finds a part gone and reads again.
    Returns how many parts were retired."""
    current = current_parts(state)
    stale = sorted(part for part, shard in state.shards.items() if shard["rows"] > len(current.get(part, ())))
    if not stale:
        return 0
    kept = sorted(video for part in stale for video in current.get(part, ()))
    records, shards = [], [{"path": part, "rows": 0} for part in stale]
    if kept:
        merged = f"part-{uuid.uuid4().hex}"
        for folder in _folders(job):
            rows = pa.concat_tables([_rows_of(out, folder, part, current[part]) for part in stale if part in current])
            pq.write_table(rows, out.path(folder, f"{merged}.parquet"), filesystem=out.fs)
        records = [replace(state.videos[video], shard=merged) for video in kept]
        shards.append({"path": merged, "rows": len(kept)})
    lock.refresh()
    manifest.commit(out, MANIFESTS, lock.run_id, records, shards)
    for part in stale:
        for folder in _folders(job):
            if out.exists(f"{folder}/{part}.parquet"):  # gone already: deleted by an older --out's re-runs
                out.delete(f"{folder}/{part}.parquet")
    return len(stale)


def _folders(job: Job) -> tuple[str, ...]:
    return (PREDICTIONS, WINDOWS) if job.windows else (PREDICTIONS,)


# --- one run at a time -----------------------------------------------------------------------------

class RunLock:
    """One infer run at a time per --out. lock/<n>.json names the run holding it: run id, host, pid, started_at
    and heartbeat_at (rewritten every LOCK_HEARTBEAT_S and before each commit). The newest n holds; a run takes
    the lock by creating the next n, which only one of two racing runs can (O_EXCL on a local or NFS folder, a
    conditional PUT `If-None-Match: *` on S3). The newest lock is free once its run released it or died: on this
    host its pid is gone, from any host its heartbeat is older than LOCK_STALE_S. A run whose lock was taken over
    (it looked dead) finds a newer n at its next commit and stops there, so its parts are never committed after
    the new holder dropped them."""

    def __init__(self, out: Storage, run_id: str):
        self.out, self.run_id = out, run_id
        self.number = 0  # the lock/<n>.json held, once acquired
        self.body = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        self._mutex = threading.Lock()  # the heartbeat thread and the commits both refresh
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="infer-lock-heartbeat", daemon=True)

    def acquire(self) -> dict | None:
        """Take the lock, or raise InferError naming its holder; returns the dead run's lock taken over, if any."""
        for _ in range(3):  # losing a race to create the next lock: that run holds it
            number, held = self._newest()
            if held and not held.get("released") and not _dead(held):
                raise InferError(f"--out {self.out.uri()}: another infer run is writing there (run {held['run_id']}, "
                                 f"{holder(held)}); wait for it to end, or give another --out. A lock whose run died "
                                 f"is taken over: on its host once its pid is gone, from another after "
                                 f"{LOCK_STALE_S:g} s without a heartbeat")
            if self._create(number + 1):
                self.number = number + 1
                for older in self.out.list(LOCKS, suffix=".json"):
                    if _lock_number(older) < self.number:
                        self.out.delete(older)
                self._beat.start()
                return held if held and not held.get("released") else None
        raise InferError(f"--out {self.out.uri()}: other infer runs keep taking its lock; run one at a time")

    def refresh(self) -> None:
        """Rewrite the heartbeat; raise InferError if another run has taken the lock over."""
        with self._mutex:
            number, held = self._newest()
            if number != self.number:
                raise InferError(f"--out {self.out.uri()}: run {held['run_id']} ({holder(held)}) took this run's lock "
                                 f"over, judging it dead (its pid gone, or no heartbeat for {LOCK_STALE_S:g} s): this "
                                 "run stops; what it committed stays")
            self.out.write_bytes(self._name(self.number), self._encode())

    def release(self) -> None:
        """Mark the lock free (when it is still ours)."""
        self._stop.set()
        if self._beat.is_alive():
            self._beat.join()
        with self._mutex:
            try:
                if self.number and self._newest()[0] == self.number:
                    self.out.write_bytes(self._name(self.number), self._encode(released=True))
            except OSError:  # --out unreachable: the next run takes the lock over once this pid is gone
                pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                self.refresh()
            except InferError:  # taken over: the next commit's refresh says so
                return
            except OSError:  # a failed write: the next beat tries again (stale only after LOCK_STALE_S)
                continue

    def _newest(self) -> tuple[int, dict | None]:
        while True:
            names = self.out.list(LOCKS, suffix=".json")
            if not names:
                return 0, None
            try:
                return _lock_number(names[-1]), json.loads(self.out.read_bytes(names[-1]))
            except FileNotFoundError:  # a newer one was taken since the listing, and this one deleted
                continue

    def _create(self, number: int) -> bool:
        """Create lock/<number>.json holding this run, unless it exists (another run won it)."""
        data = self._encode()
        if self.out.is_s3:
            from botocore.exceptions import ClientError

            bucket, prefix = split_s3(self.out.root)
            try:
                VideoSource(self.out.root, self.out.s3).client.put_object(
                    Bucket=bucket, Key=posixpath.join(prefix, self._name(number)), Body=data, IfNoneMatch="*")
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    return False  # 412: it exists; 409: another conditional write of it is under way
                raise InferError(f"--out {self.out.uri()}: cannot write its lock ({exc})") from exc
            return True
        target = self.out.path(self._name(number))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Written whole, then linked into place: link fails if the name exists, and no reader sees a part-written lock.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _encode(self, released: bool = False) -> bytes:
        return json.dumps({**self.body, "heartbeat_at": time.time(), "released": released}).encode()

    @staticmethod
    def _name(number: int) -> str:
        return f"{LOCKS}/{number:010d}.json"


def _lock_number(rel: str) -> int:
    return int(posixpath.basename(rel).removesuffix(".json"))


def holder(lock: dict) -> str:
    """Who holds a lock, for a message: host, pid, when it started and last beat."""
    now = time.time()
    return (f"host {lock['host']}, pid {lock['pid']}, started {now - lock['started_at']:.0f} s ago, last heartbeat "
            f"{now - lock['heartbeat_at']:.0f} s ago")


def _dead(lock: dict) -> bool:
    """Whether a held lock's run is gone: its pid, when it ran on this host; else its heartbeat's age."""
    if lock["host"] == socket.gethostname() and not _pid_alive(lock["pid"]):
        return True
    return time.time() - lock["heartbeat_at"] > LOCK_STALE_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# --- reading --out -----------------------------------------------------------------------------------

def read_predictions(out_uri: str, s3: S3Options | None = None) -> pa.Table:
    """The predictions in an --out folder: each video's latest committed row, exactly one per video, sorted by
    video; right at any moment (a run writing there, one that crashed, videos scored again). Read --out through
    this rather than as a Parquet folder: predictions/ also holds the parts a running or crashed run has not
    committed, and a re-scored video's superseded row until the run that re-scored it ends."""
    return read_committed(Storage(out_uri, s3), PREDICTIONS)


def read_windows(out_uri: str, s3: S3Options | None = None) -> pa.Table:
    """The timeline windows (`--windows`) of each video's latest committed result, sorted by video and window."""
    return read_committed(Storage(out_uri, s3), WINDOWS)


def read_committed(out: Storage, folder: str) -> pa.Table:
    """The rows of `folder` (predictions or windows) whose video's latest committed record names their part, as of
    the manifests read first: parts never change once written, so the read is that moment's state, unless a
    compaction deleted a part meanwhile; then it starts over."""
    if not out.exists("infer.json"):
        raise InferError(f"{out.uri()}: no infer results there (no infer.json)")
    job = Job(**json.loads(out.read_bytes("infer.json"))["job"])
    if folder == WINDOWS and not job.windows:
        raise InferError(f"{out.uri()}: scored without --windows: it holds no windows")
    for _ in range(READ_TRIES):
        parts = current_parts(manifest.DatasetState.load(out, MANIFESTS))
        try:
            tables = [_rows_of(out, folder, part, videos) for part, videos in sorted(parts.items())]
        except FileNotFoundError:  # retired by a compaction since the manifests were read
            continue
        if not tables:  # no video scored yet: the columns, no rows
            return predictions_table([], Job()) if folder == PREDICTIONS else windows_table([])
        table = pa.concat_tables(tables)
        return table.sort_by([("video", "ascending")] + ([("window", "ascending")] if folder == WINDOWS else []))
    raise InferError(f"{out.uri()}: parts were compacted away while being read, {READ_TRIES} times; read again")


def _rows_of(out: Storage, folder: str, part: str, videos: set[str]) -> pa.Table:
    """The rows of `videos` in a part, its file read in one go: a deletion meanwhile is FileNotFoundError, never
    half a file."""
    table = pq.read_table(pa.BufferReader(out.read_bytes(f"{folder}/{part}.parquet")))
    return table.filter(pc.is_in(table["video"], value_set=pa.array(sorted(videos), pa.string())))
