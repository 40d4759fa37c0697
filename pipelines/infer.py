"""Batch inference on Ray Data: score a folder, an s3:// prefix or a list of videos with a registered model.

CPU tasks open each video and cut its test views (and a timeline's windows) through the one clip path
(`ClipSpec.cut_views`); an actor pool (a GPU per actor, or CPUs) runs the network and aggregates each
video's views; the driver writes Parquet and commits a manifest at least every `infer.commit_every_s`.
Only committed results count: a re-run into the same --out scores exactly the videos that have no
committed result (new ones, changed ones, and those an interrupted run had not committed), and deletes
the uncommitted files an interrupted run left. Bad videos are committed too, with the reason preprocess
would give them (quarantine.csv), so they are not retried until the file changes.

--out holds, per committed batch `part-<id>`: predictions/part-<id>.parquet (video, labels, scores,
views, embedding if asked) and windows/part-<id>.parquet (one row per timeline window, if asked); the
manifests/ commit log; quarantine.csv; infer.json (the model and options the folder's results come from:
another model or other options need another --out).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slowfast.serving import ClipSpec, VideoClassifier, window_probabilities
from slowfast.shards import manifest
from slowfast.video.clips import positive_seconds
from slowfast.video.decode import DECODE_ERROR, VideoDecodeError

from . import tracking
from .config import InferSection, PipelineConfig
from .errors import PipelineError
from .ingest import MISSING_FILE, ZERO_BYTES, video_paths
from .storage import S3Options, Storage, StorageError, VideoSource, is_s3, split_s3

MANIFESTS, PREDICTIONS, WINDOWS = "manifests", "predictions", "windows"
DECODE_RETRIES = 3


class InferError(PipelineError, ValueError):
    """Inference that cannot start: names the input (model, videos, --out) and the fix."""


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


# --- listing -------------------------------------------------------------------------------------

def list_videos(videos: str, s3: S3Options) -> tuple[list[VideoTask], list[tuple[str, str, str]]]:
    """The videos --videos names (a folder, an s3:// prefix, or a text file listing one video per line),
    and those that cannot be scored as (video, reason, detail): missing, empty, or not a video file."""
    if not is_s3(videos) and Path(videos).is_file():
        return _list_file(Path(videos), s3)
    source = VideoSource(videos, s3)
    files = source.list()
    found, ignored = video_paths(files)
    tasks, bad = [], []
    for parts in found:
        f = files["/".join(parts)]
        task = VideoTask(source.uri(f.rel), source.root, f.rel, f.size, f.etag)
        (bad.append((task.video, ZERO_BYTES, "the file is empty")) if f.size == 0 else tasks.append(task))
    if not tasks and not bad:
        raise InferError(f"--videos {videos}: no video files there ({len(ignored)} other files); give a folder or "
                         "s3:// prefix holding videos, or a text file listing them")
    return tasks, bad


def _list_file(path: Path, s3: S3Options) -> tuple[list[VideoTask], list[tuple[str, str, str]]]:
    """A list file: one video per line, a local path (relative to the list's folder) or s3://bucket/key;
    blank lines and lines starting with # are skipped."""
    tasks, bad, seen = [], [], set()
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#") or entry in seen:
            continue
        seen.add(entry)
        if is_s3(entry):
            bucket, key = split_s3(entry)
            source = VideoSource(f"s3://{bucket}", s3)
            try:
                head = source.client.head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - botocore's errors: all mean "cannot read it"
                bad.append((entry, MISSING_FILE, f"{type(exc).__name__}: {exc}"))
                continue
            size, etag, root, rel = head["ContentLength"], head["ETag"].strip('"'), f"s3://{bucket}", key
        else:
            file = Path(entry) if os.path.isabs(entry) else path.parent / entry
            if not file.is_file():
                bad.append((entry, MISSING_FILE, f"no file {file}"))
                continue
            st = file.stat()
            size, etag, root, rel = st.st_size, f"{st.st_size}-{st.st_mtime_ns}", str(file.parent), file.name
        if size == 0:
            bad.append((entry, ZERO_BYTES, "the file is empty"))
        else:
            tasks.append(VideoTask(entry, root, rel, size, etag))
    if not tasks and not bad:
        raise InferError(f"--videos {path}: the list names no video (one path or s3:// URI per line)")
    return tasks, bad


# --- the Ray Data stages -------------------------------------------------------------------------

def cut_views(batch: dict, spec: dict, job: dict, s3: S3Options) -> dict:
    """Ray Data task (decode tasks scale with the CPUs, unlike a fixed actor pool): videos in, their views out
    (fast frames as raw uint8 bytes plus shape), or why not."""
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
        except VideoDecodeError as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:  # noqa: BLE001 - one bad video is reported, the run goes on
            reason, detail = DECODE_ERROR, f"{type(exc).__name__}: {exc}"
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
    """Delete the parts an interrupted run wrote but never committed; returns how many."""
    committed = {rec.shard for rec in state.videos.values() if rec.shard}
    dropped = 0
    for folder in (PREDICTIONS, WINDOWS):
        for rel in out.list(folder, suffix=".parquet"):
            if posixpath.basename(rel).removesuffix(".parquet") not in committed:
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
    """Score every video --videos names that --out has no committed result for; returns the summary
    (also written to --out/summary.json)."""
    import ray

    from .ray_runtime import init_ray, stops_when_stalled

    job.check()
    started = time.time()
    s3 = S3Options(cfg.s3.endpoint_url, cfg.s3.region)
    out = Storage(out_uri, s3)
    try:
        out.check_writable("--out")
    except StorageError as exc:
        raise InferError(str(exc)) from None
    out.makedirs(PREDICTIONS)
    out.makedirs(WINDOWS)
    try:
        loaded = tracking.load_registered(cfg, model_uri)
    except tracking.TrackingError as exc:
        raise InferError(f"--model-uri {model_uri}: {exc}") from None
    ident = identity(loaded, job, model_uri)
    check_out(out, ident)
    try:
        tasks, bad = list_videos(videos, s3)
    except StorageError as exc:
        raise InferError(f"--videos {videos}: {exc}") from None
    state = manifest.DatasetState.load(out, MANIFESTS)
    dropped = drop_uncommitted(out, state)
    todo = [t for t in tasks if not state.is_current(t.video, t.size, t.etag)]
    bad = [b for b in bad if b[0] not in state.videos]
    log(f"infer: {len(tasks) + len(bad)} videos listed in {videos}: {len(todo)} to score, "
        f"{len(tasks) - len(todo)} already scored in {out.uri()}" + (f", {len(bad)} unreadable" if bad else "")
        + (f" ({dropped} uncommitted files of an interrupted run removed)" if dropped else ""))
    run_id = uuid.uuid4().hex[:12]
    writer = Writer(out, run_id, job, cfg.infer.commit_every_s, log, total=len(todo) + len(bad))
    if bad:
        writer.add([{"video": v, "size": 0, "etag": "", "reason": r, "detail": d, "views": 0} for v, r, d in bad])
    if todo:
        # The decode tasks open the videos on whichever node they run: a local folder must be on every node.
        init_ray(cfg, shared={"--videos": videos if not os.path.isfile(videos) else ""})
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
        ds = decode_tasks(ds, cut_views, cfg, fn_kwargs=dict(spec=asdict(loaded.spec), job=asdict(job), s3=s3))
        ds = ds.map_batches(Score, batch_size=cfg.infer.batch_videos, batch_format="numpy", **scoring_actors(cfg),
                            fn_constructor_kwargs=dict(model=[ray.put(packed)], job=asdict(job),
                                                       use_gpu=cfg.infer.use_gpu, threads=threads,
                                                       mixed_precision=cfg.infer.mixed_precision))
        with stops_when_stalled(cfg, "infer's decode tasks and scoring actors", InferError):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add([{k: _scalar(batch[k][i]) for k in batch} for i in range(len(batch["video"]))])
    writer.flush()
    state = manifest.DatasetState.load(out, MANIFESTS)
    report = write_quarantine(out, state)
    scored = sum(1 for v in state.videos.values() if not v.quarantined)
    wall = time.time() - started
    summary = {"model_uri": model_uri, "videos": videos, "out": out.uri(), "listed": len(tasks) + len(bad),
               "scored_now": writer.scored, "quarantined_now": writer.quarantined, "scored_total": scored,
               "quarantined_total": len(state.videos) - scored, "views_now": writer.views,
               "cut_cpu_s": round(writer.cpu_s["cut"], 3), "score_cpu_s": round(writer.cpu_s["score"], 3),
               "wall_s": round(wall, 2), "videos_per_s": round(writer.scored / wall, 3) if writer.scored else 0.0,
               "quarantine_report": report, "predictions": out.uri(PREDICTIONS),
               "windows": out.uri(WINDOWS) if job.windows else None}
    out.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


class Writer:
    """The driver's end: results into Parquet parts, committed with a manifest every so often."""

    def __init__(self, out: Storage, run_id: str, job: Job, every_s: float, log, total: int):
        self.out, self.run_id, self.job, self.every_s, self.log, self.total = out, run_id, job, every_s, log, total
        self.pending: list[dict] = []
        self.last = time.time()
        self.scored = self.quarantined = self.views = 0
        self.cpu_s = {"cut": 0.0, "score": 0.0}  # CPU seconds the decode tasks and scoring actors spent

    def add(self, rows: list[dict]) -> None:
        self.pending.extend(rows)
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
        manifest.commit(self.out, MANIFESTS, self.run_id, records, [{"path": part, "rows": len(good)}] if good else [])
        self.scored += len(good)
        self.quarantined += len(self.pending) - len(good)
        self.views += sum(int(r["views"]) for r in good)
        for step in self.cpu_s:
            self.cpu_s[step] += sum(float(r.get(f"{step}_cpu_s", 0.0)) for r in self.pending)
        self.pending.clear()
        self.last = time.time()
        self.log(f"  infer: {self.scored + self.quarantined}/{self.total} videos committed "
                 f"({self.quarantined} unreadable)")


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
