"""Batch inference on Ray Data: score a folder, an s3:// prefix or a list of videos with a registered model.

CPU tasks open each video and cut its test views (and a timeline's windows) through the one clip path, `chunk_clips`
clips at a time (`ClipSpec.iter_views`), so memory does not grow with a video's windows; an actor pool (a GPU per
actor, or CPUs) scores each chunk's views; the driver gathers a video's chunks, averages its views as predict does
(`window_means`) and hands the video's row to the --out folder's `Writer` (pipelines/infer_out.py), which commits
Parquet parts by manifest at least every `infer.commit_every_s`.

A re-run into the same --out scores exactly the videos with no current committed record (new, changed, not committed
by an interrupted run, or not read). A video's own faults are committed with preprocess's reasons (quarantine.csv),
as is a timeline over the job's limits (`timeline_limit`), and not retried until the file changes; a video the storage
failed to deliver, or whose cut failed unexpectedly, is not committed: it is counted as unread, the run fails past
`infer.max_unread`, and the next run scores it. So is a video whose chunks were not all scored when the run died.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from slowfast.serving import ClipSpec, VideoClassifier, window_means
from slowfast.shards import manifest
from slowfast.video.clips import TimelineLimitError
from slowfast.video.decode import DECODE_ERROR, VideoDecodeError

from . import tracking
from .config import InferSection, PipelineConfig
from .infer_out import (
    LIMIT_FLAGS,
    MANIFESTS,
    PREDICTIONS,
    READ_FAILED,
    UNEXPECTED,
    UNREAD,
    WINDOWS,
    InferError,
    Job,
    RunLock,
    Writer,
    check_out,
    compact,
    drop_uncommitted,
    holder,
    identity,
    write_quarantine,
)
from .ingest import MISSING_FILE, ZERO_BYTES, video_paths
from .storage import _NOT_FOUND, ReadFailed, S3Options, Storage, StorageError, VideoSource, is_s3, s3_options, split_s3

DECODE_RETRIES = 3
TIMELINE_LIMIT = "timeline_limit"  # committed: the video is fine, its timeline asks for more than the job's limits


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
        raise InferError(
            f"--videos {videos}: no video files there ({len(ignored)} other files); give a folder or "
            "s3:// prefix holding videos, or a text file listing them"
        )
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
    local = [os.path.join(t.root, t.rel) for t in tasks if not is_s3(t.root)] + [
        b.video for b in bad if not is_s3(b.video)
    ]
    if not local:
        return {}
    return {f"--videos {videos} names {len(local)} local file{'s' * (len(local) != 1)}, e.g.": local[0]}


# --- the Ray Data stages -------------------------------------------------------------------------


def cut_views(batch: dict, spec: dict, job: dict, s3: S3Options, chunk_clips: int) -> Iterator[dict]:
    """Ray Data task (decode tasks scale with the CPUs, unlike a fixed actor pool), a generator: per video, a row per
    chunk of at most `chunk_clips` clips' views (fast frames as raw uint8 bytes plus shape), cut in one pass over the
    video; or a row saying why not: a quarantine reason, TIMELINE_LIMIT, or one of UNREAD (also after some chunks,
    when the video fails part way: the driver drops them). Chunk 0 also carries the video's windows."""
    spec, job = ClipSpec(**spec), Job(**job)
    for i in range(len(batch["video"])):
        task = VideoTask(**{k: _scalar(batch[k][i]) for k in ("video", "root", "rel", "size", "etag")})
        started = time.process_time()  # the codec's threads included
        try:
            for chunk in _chunks(VideoSource(task.root, s3), task, spec, job, chunk_clips):
                yield _cut_row(task, **chunk, cut_cpu_s=time.process_time() - started)
                started = time.process_time()
            continue
        except VideoDecodeError as exc:  # the video's own fault: quarantined
            reason, detail = exc.reason, exc.detail
        except TimelineLimitError as exc:  # the request's: committed too, another --out with higher limits scores it
            reason, detail = TIMELINE_LIMIT, f"{exc.problem}; raise {LIMIT_FLAGS[exc.key]} to allow it"
        except ReadFailed as exc:  # the storage's, after its retries: read again by the next run
            reason, detail = READ_FAILED, exc.detail
        except (OSError, MemoryError) as exc:  # a local disk's I/O error, this worker's memory: not committed
            reason, detail = UNEXPECTED, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - its bytes were read and broke the decoder in a way it does not
            # name: committed as decode_error, as preprocess does (a bug must not fail every later run)
            reason, detail = DECODE_ERROR, f"unexpected {type(exc).__name__}: {exc}"
        yield _cut_row(task, reason=reason, detail=detail, cut_cpu_s=time.process_time() - started)


def _chunks(source: VideoSource, task: VideoTask, spec: ClipSpec, job: Job, chunk_clips: int) -> Iterator[dict]:
    """The test views, then (with a timeline) every window's, `chunk_clips` clips at a time; each chunk's number, the
    video's chunk count and how many of its views are test views. Two passes over the video: a chunk holds the frames
    its own clips span, and the test views span the whole video where the windows' chunks follow each other."""
    with spec.open(source.open(task.rel), task.video) as reader:
        plan = spec.plan(
            reader.info.frames_at(spec.target_fps),
            windows=job.windows,
            window_s=job.window_s,
            stride_s=job.stride_s,
            limits=job.limits,
        )
        window_plans = [p for w in plan.windows for p in w.plans]
        passes = [(plan.test, True)] + ([(window_plans, False)] if window_plans else [])
        count = sum(math.ceil(len(plans) / chunk_clips) for plans, _ in passes)
        windows = [{"start_s": w.start_s, "end_s": w.end_s, "clips": len(w.plans)} for w in plan.windows]
        k = 0
        for plans, test in passes:
            for fast in spec.iter_views(reader, plans, chunk_clips):
                yield {
                    "chunk": k,
                    "chunks": count,
                    "fast": fast,
                    "test_views": len(fast) if test else 0,
                    "windows": windows if k == 0 else [],
                }
                k += 1


def _cut_row(
    task: VideoTask,
    *,
    chunk: int = 0,
    chunks: int = 0,
    fast: np.ndarray | None = None,
    test_views: int = 0,
    windows: list | None = None,
    reason: str = "",
    detail: str = "",
    cut_cpu_s: float,
) -> dict:
    """One output batch of `cut_views`: one row. "" rather than None: a column of nulls does not come back from Arrow
    as strings."""
    row = {
        "video": task.video,
        "size": task.size,
        "etag": task.etag,
        "chunk": chunk,
        "chunks": chunks,
        "views": b"" if fast is None else fast.tobytes(),
        "shape": [] if fast is None else list(fast.shape),
        "test_views": test_views,
        "windows": json.dumps(windows or []),
        "reason": reason,
        "detail": detail,
        "cut_cpu_s": cut_cpu_s,
    }
    return {k: [v] for k, v in row.items()}


class Score:
    """Ray Data actor: chunks of views in; out, per chunk, each view's class probabilities (float32 bytes, views x
    classes) and, with --embeddings, its test views' pooled features: what the driver averages (`Gatherer`)."""

    PASSED = ("video", "size", "etag", "chunk", "chunks", "test_views", "windows", "reason", "detail", "cut_cpu_s")

    def __init__(self, model: list, job: dict, use_gpu: bool, threads: int, mixed_precision: bool):
        net, packed = unpack_model(model, threads)
        self.classifier = VideoClassifier(
            net,
            packed["class_names"],
            ClipSpec(**packed["spec"]),
            device="cuda" if use_gpu else "cpu",
            batch_views=packed["batch_views"],
            mixed_precision=mixed_precision,
        )
        self.embeddings = Job(**job).embeddings

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in (*self.PASSED, "probs", "features", "score_cpu_s")}
        for i in range(len(batch["video"])):
            row = {k: _scalar(batch[k][i]) for k in self.PASSED}
            row.update(probs=b"", features=b"", score_cpu_s=0.0)
            if not row["reason"]:
                started = time.process_time()  # torch's threads included
                # A writable copy: torch refuses to wrap read-only memory without a warning.
                fast = np.frombuffer(batch["views"][i], np.uint8).reshape([int(n) for n in batch["shape"][i]]).copy()
                test = int(row["test_views"])
                probs, feats = self.classifier.score(
                    fast, self.classifier.spec.slow_index, features=self.embeddings and test > 0
                )
                row["probs"] = probs.tobytes()
                if feats is not None:
                    row["features"] = feats[:test].tobytes()
                row["score_cpu_s"] = time.process_time() - started
            for k, v in row.items():
                out[k].append(v)
        return out


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
        return ds.map_batches(
            fn,
            batch_size=1,
            batch_format="numpy",
            num_cpus=cfg.infer.decode_cpus,
            max_retries=DECODE_RETRIES,
            fn_kwargs=fn_kwargs,
            **data_nodes(cfg),
        )


def scoring_actors(cfg: PipelineConfig) -> dict:
    """map_batches arguments of a scoring actor pool: CPUs or a GPU per actor, as many as `pool_size`
    (the pool grows while videos wait, and an autoscaler sees the demand), on the train nodes."""
    from ray.data import ActorPoolStrategy

    from .ray_runtime import train_nodes

    return dict(
        num_cpus=cfg.infer.cpus_per_worker,
        num_gpus=1 if cfg.infer.use_gpu else 0,
        compute=ActorPoolStrategy(min_size=1, max_size=pool_size(cfg.infer)),
        **train_nodes(cfg),
    )


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


# --- the driver ----------------------------------------------------------------------------------


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
        raise InferError(
            f"{n} video{'s' * (n != 1)} not read ({why}; e.g. {summary['unread_examples'][0]}): "
            f"nothing was committed for them, everything else was; run the same command again to score "
            f"them (infer.max_unread: {cfg.infer.max_unread} allowed)"
        )
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
    log(
        f"infer: {len(tasks) + len(bad)} videos listed in {videos}: {len(todo)} to score, "
        f"{len(tasks) - len(todo)} already scored in {out.uri()}"
        + (f", {len(bad) - unchecked} unreadable" if len(bad) > unchecked else "")
        + (f", {unchecked} not checked (a failed HEAD)" if unchecked else "")
        + (f" ({dropped} uncommitted files of an interrupted run removed)" if dropped else "")
    )
    if todo or (bad and joins_cluster(cfg)):
        # Before anything is committed: the decode tasks open the videos on whichever node they run, so what of
        # --videos is local must be on every node.
        init_ray(cfg, shared=local_inputs(videos, tasks, bad))
    writer = Writer(out, job, lock, every_s=cfg.infer.commit_every_s, log=log, total=len(todo) + len(bad))
    if bad:
        writer.add(
            [{"video": b.video, "size": 0, "etag": "", "reason": b.reason, "detail": b.detail, "views": 0} for b in bad]
        )
    if todo:
        workers = pool_size(cfg.infer)
        packed = pack_model(
            loaded.model, class_names=loaded.class_names, spec=asdict(loaded.spec), batch_views=loaded.spec.views
        )
        threads = max(1, math.ceil(cfg.infer.cpus_per_worker))
        per_actor = "1 GPU" if cfg.infer.use_gpu else f"{cfg.infer.cpus_per_worker:g} CPU"
        log(f"infer: {workers} scoring actor(s) ({per_actor} each), decode tasks of {cfg.infer.decode_cpus:g} CPU")
        ds = ray.data.from_items([asdict(t) for t in todo], override_num_blocks=len(todo))
        # Decode tasks retry on their own (a lost worker's video is cut again); their remote args differ
        # from the actors', which also keeps Ray Data from fusing decoding into the scoring actors: tasks
        # scale with the CPUs, the pool with the workers, and a GPU actor never waits on PyAV.
        ds = decode_tasks(
            ds,
            cut_views,
            cfg,
            fn_kwargs=dict(spec=asdict(loaded.spec), job=asdict(job), s3=out.s3, chunk_clips=cfg.infer.chunk_clips),
        )
        ds = ds.map_batches(
            Score,
            batch_size=cfg.infer.batch_videos,
            batch_format="numpy",
            **scoring_actors(cfg),
            fn_constructor_kwargs=dict(
                model=[ray.put(packed)],
                job=asdict(job),
                use_gpu=cfg.infer.use_gpu,
                threads=threads,
                mixed_precision=cfg.infer.mixed_precision,
            ),
        )
        gatherer = Gatherer(loaded, job)
        with stops_when_stalled(cfg, "infer's decode tasks and scoring actors", InferError):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(gatherer.add([{k: _scalar(batch[k][i]) for k in batch} for i in range(len(batch["video"]))]))
        writer.add(gatherer.unfinished())
    writer.flush()
    compacted = compact(out, manifest.DatasetState.load(out, MANIFESTS), job, lock)
    state = manifest.DatasetState.load(out, MANIFESTS)
    report = write_quarantine(out, state)
    scored = sum(1 for v in state.videos.values() if not v.quarantined)
    wall = time.time() - started
    unread = writer.unread
    summary = {
        "model_uri": model_uri,
        "videos": videos,
        "out": out.uri(),
        "listed": len(tasks) + len(bad),
        "scored_now": writer.scored,
        "quarantined_now": writer.quarantined,
        "unread_now": len(unread),
        "unread_reasons": dict(Counter(r["reason"] for r in unread)),
        "unread_examples": [f"{r['video']}: {r['reason']}: {r['detail']}" for r in unread[:3]],
        "scored_total": scored,
        "quarantined_total": len(state.videos) - scored,
        "views_now": writer.views,
        "parts_compacted": compacted,
        "cut_cpu_s": round(writer.cpu_s["cut"], 3),
        "score_cpu_s": round(writer.cpu_s["score"], 3),
        "wall_s": round(wall, 2),
        "videos_per_s": round(writer.scored / wall, 3) if writer.scored else 0.0,
        "quarantine_report": report,
        "predictions": out.uri(PREDICTIONS),
        "windows": out.uri(WINDOWS) if job.windows else None,
    }
    out.write_bytes("summary.json", json.dumps(summary, indent=1).encode())
    return summary


class Gatherer:
    """The driver's side of the chunks: a video's scored chunks, arriving in any order and between other videos',
    held until all are in; then the video's row for the Writer: the mean of its test views' probabilities and its
    top-k, embedding and per-window top-k, averaged by `window_means` as predict averages them. A video whose cut
    failed, even part way, is its failure row; one whose chunks are not all in when the run dies is never handed on
    (the next run scores it)."""

    def __init__(self, classifier: VideoClassifier, job: Job):
        self.classifier, self.job = classifier, job
        self.held: dict[str, dict[int, dict]] = {}  # video -> chunk number -> its scored row
        self.finished: set[str] = set()  # videos handed on: a chunk of theirs arriving later is dropped

    def add(self, rows: list[dict]) -> list[dict]:
        """The rows of the videos that these scored chunk rows complete (or fail)."""
        done = []
        for row in rows:
            video = row["video"]
            if video in self.finished:  # a chunk cut before its video failed part way, or a retried task's repeat
                continue
            if row["reason"]:
                earlier = list(self.held.pop(video, {}).values())
                done.append(self._video_row(row, [*earlier, row], reason=row["reason"], detail=row["detail"]))
            else:
                chunks = self.held.setdefault(video, {})
                chunks[int(row["chunk"])] = row
                if len(chunks) < int(row["chunks"]):
                    continue
                done.append(self._scores(self.held.pop(video)))
            self.finished.add(video)
        return done

    def unfinished(self) -> list[dict]:
        """The videos with chunks still missing once the stream has ended (a chunk lost: never committed)."""
        rows = []
        for chunks in self.held.values():
            some = list(chunks.values())
            rows.append(
                self._video_row(
                    some[0], some, reason=UNEXPECTED, detail=f"{len(some)} of {some[0]['chunks']} chunks scored"
                )
            )
        self.held.clear()
        return rows

    def _scores(self, chunks: dict[int, dict]) -> dict:
        c, job = self.classifier, self.job
        rows = [chunks[k] for k in range(len(chunks))]
        test = sum(int(r["test_views"]) for r in rows)
        windows = json.loads(rows[0]["windows"])
        probs = (np.frombuffer(r["probs"], np.float32).reshape(-1, len(c.class_names)) for r in rows)
        means = window_means(probs, [test] + [w["clips"] * c.spec.spatial_crops for w in windows])
        top = c.top(means[0], job.top_k)
        out = self._video_row(
            rows[0], rows, views=test, labels=json.dumps(top["labels"]), scores=json.dumps(top["scores"])
        )
        if job.embeddings:
            feats = np.frombuffer(b"".join(r["features"] for r in rows), np.float32).reshape(test, -1)
            out["embedding"] = feats.mean(0).astype(np.float32).tobytes()
        if windows:
            out["windows"] = json.dumps(
                [
                    {"start_s": round(w["start_s"], 3), "end_s": round(w["end_s"], 3), **c.top(p, job.top_k)}
                    for w, p in zip(windows, means[1:], strict=True)
                ]
            )
        return out

    @staticmethod
    def _video_row(first: dict, chunks: list[dict], **fields) -> dict:
        """A video's row as the Writer takes it, with its chunks' CPU time summed."""
        row = {
            "video": first["video"],
            "size": int(first["size"]),
            "etag": first["etag"],
            "reason": "",
            "detail": "",
            "views": 0,
            "labels": "[]",
            "scores": "[]",
            "embedding": b"",
            "windows": "[]",
            "cut_cpu_s": sum(float(r["cut_cpu_s"]) for r in chunks),
            "score_cpu_s": sum(float(r["score_cpu_s"]) for r in chunks),
        }
        return {**row, **fields}
