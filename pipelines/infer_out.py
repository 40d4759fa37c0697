"""The --out folder of `pipelines infer`: what its results come from (infer.json), the one run writing there
(`RunLock`), Parquet parts committed by manifest (`Writer`) and compacted, and each video's latest committed row
read back (`read_predictions`, `read_windows`): exactly once, as a reader sees it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slowfast.serving import VideoClassifier
from slowfast.shards import manifest
from slowfast.video.clips import MAX_CLIPS, MAX_WINDOWS, TimelineLimits, positive_seconds

from .errors import PipelineError
from .storage import S3Options, Storage, StorageError

# --out holds, per committed batch `part-<id>`: predictions/part-<id>.parquet (video, labels, scores, views, embedding
# if asked) and windows/part-<id>.parquet (one row per timeline window, if asked); the manifests/ commit log; lock/
# (the run writing there); quarantine.csv; infer.json (the model and options the folder's results come from: another
# model or other options need another --out); summary.json (the last run's figures).
MANIFESTS, PREDICTIONS, WINDOWS, LOCKS = "manifests", "predictions", "windows", "lock"
# Why a video was not read: not its fault, so never committed (the next run scores it), unlike a quarantine reason.
READ_FAILED = "read_failed"  # the storage did not deliver it (after its retries), or a HEAD of it failed
UNEXPECTED = "unexpected_error"  # a local I/O or memory error while cutting it, or a chunk lost on the way
UNREAD = (READ_FAILED, UNEXPECTED)
LOCK_HEARTBEAT_S = 30.0  # a run rewrites its lock this often, and before each commit
LOCK_STALE_S = 600.0  # a lock not rewritten for this long is a dead run's (the hosts' clocks agreeing within a minute)
READ_TRIES = 5  # a reader starts over when a part it was to read has been compacted away
LIMIT_FLAGS = {"max_windows": "--max-windows", "max_clips": "--max-clips"}  # the Job's `TimelineLimits` keys


class InferError(PipelineError, ValueError):
    """Inference that cannot start or finish: names the input (model, videos, --out) and the fix."""


@dataclass(frozen=True)
class Job:
    """What to compute per video; with the model, what an --out folder's results come from (infer.json)."""

    top_k: int = 5
    windows: bool = False  # per-window rows along each video (a timeline)
    window_s: float | None = None  # None: one clip's span
    stride_s: float | None = None  # None: window_s
    embeddings: bool = False  # the pooled features before the classifier, averaged over the test views
    max_windows: int = MAX_WINDOWS  # a timeline over these (`TimelineLimits`) is refused, its video committed as such
    max_clips: int = MAX_CLIPS

    @property
    def limits(self) -> TimelineLimits:
        return TimelineLimits(max_windows=self.max_windows, max_clips=self.max_clips)

    def check(self) -> None:
        if self.top_k < 1:
            raise InferError(f"--top-k {self.top_k}: must be 1 or more")
        for flag, value in (("--window-s", self.window_s), ("--stride-s", self.stride_s)):
            if value is not None and not positive_seconds(value):
                raise InferError(f"{flag} {value}: must be a positive number of seconds")
            if value is not None and not self.windows:
                raise InferError(f"{flag} is for timeline windows: add --windows")
        for key, flag in LIMIT_FLAGS.items():
            if getattr(self, key) != getattr(TimelineLimits(), key) and not self.windows:
                raise InferError(f"{flag} is for timeline windows: add --windows")
        try:
            _ = self.limits  # TimelineLimits checks its values as it is built
        except ValueError as exc:
            raise InferError(f"--max-windows {self.max_windows}, --max-clips {self.max_clips}: {exc}") from None


# --- what the results come from ----------------------------------------------------------------------


def identity(loaded: VideoClassifier, job: Job, model_uri: str) -> dict:
    """What an --out folder's results come from: the weights (by digest, whatever the URI said), the
    classes, the views and the job."""
    digest = hashlib.sha256()
    for key, value in sorted(loaded.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "model_uri": model_uri,
        "weights_sha256": digest.hexdigest(),
        "class_names": loaded.class_names,
        "spec": asdict(loaded.spec),
        "job": asdict(job),
    }


def check_out(out: Storage, ident: dict) -> None:
    """An --out folder holds the results of one model and job: refuse to mix in others."""
    if not out.exists("infer.json"):
        out.write_bytes("infer.json", json.dumps(ident, indent=1).encode())
        return
    held = json.loads(out.read_bytes("infer.json"))
    # A job key added since the folder was written holds its default there: the timeline limits were always applied.
    held["job"] = {**asdict(Job()), **held.get("job", {})}
    differ = [k for k in ("weights_sha256", "class_names", "spec", "job") if held.get(k) != ident[k]]
    if differ:
        raise InferError(
            f"--out {out.uri()}: holds results of {held.get('model_uri')} with other "
            f"{', '.join(differ)} than this run ({ident['model_uri']}); give another --out "
            "(or delete that folder to start over)"
        )


# --- writing -------------------------------------------------------------------------------------------


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
            pq.write_table(
                predictions_table(good, self.job), self.out.path(PREDICTIONS, f"{part}.parquet"), filesystem=self.out.fs
            )
            if self.job.windows:
                pq.write_table(windows_table(good), self.out.path(WINDOWS, f"{part}.parquet"), filesystem=self.out.fs)
        records = [
            manifest.VideoRecord(
                r["video"],
                r["video"],
                int(r["size"]),
                r["etag"],
                shard=None if r["reason"] else part,
                clips=int(r["views"]),
                reason=r["reason"] or None,
                detail=r["detail"] or None,
            )
            for r in self.pending
        ]
        self.lock.refresh()  # still ours: a run taken over (it looked dead) commits nothing more
        manifest.commit(
            self.out, MANIFESTS, self.lock.run_id, records, [{"path": part, "rows": len(good)}] if good else []
        )
        self.scored += len(good)
        self.quarantined += len(self.pending) - len(good)
        self.views += sum(int(r["views"]) for r in good)
        for step in self.cpu_s:
            self.cpu_s[step] += sum(float(r.get(f"{step}_cpu_s", 0.0)) for r in self.pending)
        self.pending.clear()
        self.last = time.time()
        self.log(
            f"  infer: {self.scored + self.quarantined}/{self.total} videos committed "
            f"({self.quarantined} unreadable" + (f", {len(self.unread)} not read" if self.unread else "") + ")"
        )


def predictions_table(rows: list[dict], job: Job) -> pa.Table:
    columns = {
        "video": pa.array([r["video"] for r in rows], pa.string()),
        "labels": pa.array([json.loads(r["labels"]) for r in rows], pa.list_(pa.string())),
        "scores": pa.array([json.loads(r["scores"]) for r in rows], pa.list_(pa.float32())),
        "views": pa.array([int(r["views"]) for r in rows], pa.int32()),
    }
    if job.embeddings:
        flat = np.concatenate([np.frombuffer(r["embedding"], np.float32) for r in rows])
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), len(flat) // len(rows))
    return pa.table(columns)


def windows_table(rows: list[dict]) -> pa.Table:
    flat = [(r["video"], k, w) for r in rows for k, w in enumerate(json.loads(r["windows"]))]
    return pa.table(
        {
            "video": pa.array([v for v, _, _ in flat], pa.string()),
            "window": pa.array([k for _, k, _ in flat], pa.int32()),
            "start_s": pa.array([w["start_s"] for _, _, w in flat], pa.float64()),
            "end_s": pa.array([w["end_s"] for _, _, w in flat], pa.float64()),
            "labels": pa.array([w["labels"] for _, _, w in flat], pa.list_(pa.string())),
            "scores": pa.array([w["scores"] for _, _, w in flat], pa.list_(pa.float32())),
        }
    )


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
        self.body = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "processes": _process_space(),
            "pid": os.getpid(),
            "started_at": time.time(),
        }
        self._mutex = threading.Lock()  # the heartbeat thread and the commits both refresh
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="infer-lock-heartbeat", daemon=True)

    def acquire(self) -> dict | None:
        """Take the lock, or raise InferError naming its holder; returns the dead run's lock taken over, if any."""
        if self.out.is_s3:
            self._check_conditional_writes()
        for _ in range(3):  # losing a race to create the next lock: that run holds it
            number, held = self._newest()
            if held and not held.get("released") and not _dead(held):
                raise InferError(
                    f"--out {self.out.uri()}: another infer run is writing there (run {held['run_id']}, "
                    f"{holder(held)}); wait for it to end, or give another --out. A lock whose run died "
                    f"is taken over: on its host once its pid is gone, from another after "
                    f"{LOCK_STALE_S:g} s without a heartbeat"
                )
            if self._create(number + 1):
                self.number = number + 1
                self._check_ours()
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
            if number != self.number or held["run_id"] != self.run_id:
                raise InferError(
                    f"--out {self.out.uri()}: run {held['run_id']} ({holder(held)}) took this run's lock "
                    f"over, judging it dead (its pid gone, or no heartbeat for {LOCK_STALE_S:g} s): this "
                    "run stops; what it committed stays"
                )
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

    def _check_ours(self) -> None:
        """The lock just created holds this run: a store that let a second writer replace it is refused."""
        number, held = self._newest()
        if number != self.number or held["run_id"] != self.run_id:
            raise InferError(
                f"--out {self.out.uri()}: run {held['run_id']} ({holder(held)}) wrote lock {number} as this "
                "run took it: one run at a time, wait for it to end or give another --out"
            )

    def _check_conditional_writes(self) -> None:
        """Refuse an S3 endpoint that does not honour If-None-Match (a second conditional PUT of one key must fail):
        without it two runs could both take the lock."""
        probe = f"{LOCKS}/.probe-{self.run_id}"
        try:
            first = self.out.create_bytes(probe, b"probe")
            second = self.out.create_bytes(probe, b"probe")
            self.out.delete(probe)
        except (StorageError, OSError) as exc:  # pyarrow's errors are OSErrors
            raise InferError(f"--out {self.out.uri()}: cannot write its lock ({exc})") from exc
        if first and second:
            raise InferError(
                f"--out {self.out.uri()}: this S3 endpoint does not honour conditional writes "
                "(If-None-Match), so one run per --out cannot be guaranteed there; give an --out on a "
                "store that does (AWS S3 since 2024, a local or shared folder)"
            )

    def _create(self, number: int) -> bool:
        """Create lock/<number>.json holding this run, unless it exists (another run won it)."""
        try:
            return self.out.create_bytes(self._name(number), self._encode())
        except StorageError as exc:
            raise InferError(f"--out {self.out.uri()}: cannot write its lock ({exc})") from exc

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
    return (
        f"host {lock['host']}, pid {lock['pid']}, started {now - lock['started_at']:.0f} s ago, last heartbeat "
        f"{now - lock['heartbeat_at']:.0f} s ago"
    )


def _dead(lock: dict) -> bool:
    """Whether a held lock's run is gone: its pid, when it ran in this process space (host, boot, pid namespace:
    a container with the host's name sees other pids); else its heartbeat's age."""
    here = lock["host"] == socket.gethostname() and lock.get("processes") == _process_space() != ""
    if here and not _pid_alive(lock["pid"]):
        return True
    return time.time() - lock["heartbeat_at"] > LOCK_STALE_S


def _process_space() -> str:
    """Where a pid means one process: this boot and pid namespace ("" where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


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
