"""Ingest: read annotations, match them to the videos on disk or S3, and plan what to decode.

Every annotation row ends in exactly one place: already committed, to be decoded now, or
quarantined here with a reason (unknown label, path outside the video root, duplicate row,
missing file, zero bytes). Decode-time reasons are added by preprocess.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, field

from slowfast.shards import manifest
from slowfast.shards.schema import FORMAT_VERSION

from .config import PipelineConfig
from .errors import PipelineError
from .storage import S3Options, SourceFile, Storage, VideoSource, is_s3, split_s3

# Plan-time quarantine reasons (decode-time ones live in slowfast.video.decode.REASONS).
UNKNOWN_LABEL = "unknown_label"
PATH_ESCAPES_ROOT = "path_escapes_root"
DUPLICATE_ROW = "duplicate_row"
MISSING_FILE = "missing_file"
ZERO_BYTES = "zero_bytes"

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


class AnnotationError(PipelineError, ValueError):
    """An annotation file that cannot be read at all (as opposed to single bad rows, which are quarantined)."""


@dataclass
class Row:
    """One annotation row, as read: the video it names, its label and (for path lists) its path."""

    line: int
    video_id: str
    label: str
    path: str | None = None  # path_label format only; Kinetics rows are found by video id


@dataclass
class Task:
    """A video to decode now."""

    video_id: str
    label: int
    rel: str
    size: int
    etag: str


@dataclass
class SplitPlan:
    split: str
    mode: str                 # "train" (random clips) or "eval" (uniform views)
    prep_hash: str
    rows_read: int
    todo: list[Task] = field(default_factory=list)
    done: int = 0             # committed earlier from the same bytes (processed or quarantined)
    quarantined: list[manifest.VideoRecord] = field(default_factory=list)
    annotated_ids: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        return {"split": self.split, "rows_read": self.rows_read, "to_decode": len(self.todo),
                "already_committed": self.done,
                "quarantined_at_plan": dict(Counter(q.reason for q in self.quarantined))}


def read_text(location: str, s3: S3Options) -> str:
    if is_s3(location):
        bucket, key = split_s3(location)
        store = Storage(f"s3://{bucket}", s3)
        return store.read_bytes(key).decode("utf-8-sig")
    try:
        with open(location, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise AnnotationError(f"{location}: annotation file not found; set data.annotations.<split> "
                              "to a Kinetics CSV or a 'path label' list") from None


def parse_kinetics_csv(text: str, source: str) -> list[Row]:
    """Official Kinetics 400/600/700 CSVs: label,youtube_id,time_start,time_end,split[,is_cc]."""
    reader = csv.DictReader(io.StringIO(text))
    needed = {"youtube_id", "time_start", "time_end"}
    if not reader.fieldnames or not needed <= set(reader.fieldnames):
        raise AnnotationError(f"{source}: not a Kinetics CSV: header {reader.fieldnames}, expected "
                              "label,youtube_id,time_start,time_end,split; for '<path> <label>' lists set "
                              "data.format: path_label")
    rows = []
    for i, rec in enumerate(reader, start=2):
        try:
            start, end = int(float(rec["time_start"])), int(float(rec["time_end"]))
        except (TypeError, ValueError):
            start, end = rec["time_start"], rec["time_end"]
            vid = f"{rec['youtube_id']}_{start}_{end}"
        else:
            vid = f"{rec['youtube_id']}_{start:06d}_{end:06d}"
        rows.append(Row(i, vid, (rec.get("label") or "").strip()))
    return rows


def parse_path_label(text: str, source: str) -> list[Row]:
    """PySlowFast lists: '<path relative to the video root> <label>' per line."""
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise AnnotationError(f"{source}:{i}: expected '<path> <label>', got {line!r}")
        path, label = parts
        # In a path list the path is the identity: two folders may hold files of the same name.
        vid = posixpath.splitext(posixpath.normpath(path))[0].lstrip("/")
        rows.append(Row(i, vid, label, path=path))
    return rows


def read_rows(cfg: PipelineConfig, split: str) -> list[Row]:
    location = cfg.data.annotations[split]
    text = read_text(location, S3Options(cfg.s3.endpoint_url, cfg.s3.region))
    parse = parse_kinetics_csv if cfg.data.format == "kinetics_csv" else parse_path_label
    return parse(text, location)


def class_names(rows: list[Row]) -> list[str]:
    """The class list, from the training annotations: sorted names (integers sorted numerically)."""
    labels = {r.label for r in rows if r.label}
    if labels and all(label.isdigit() for label in labels):
        return [str(i) for i in range(max(int(label) for label in labels) + 1)]
    return sorted(labels)


def prep_hash(cfg: PipelineConfig, classes: list[str], mode: str) -> str:
    """Everything that changes the clips in a shard; new hash, new shard folder."""
    p, m = cfg.preprocess, cfg.model
    key = {"format": FORMAT_VERSION, "mode": mode, "classes": classes, "T": m.T, "tau": m.tau, "alpha": m.alpha,
           "target_fps": p.target_fps, "short_side": p.short_side, "frame_format": p.frame_format,
           "jpeg_quality": p.jpeg_quality if p.frame_format == "jpeg" else None, "seed": p.seed,
           "clips": p.clips_per_video if mode == "train" else p.eval_views, "max_frame_pixels": p.max_frame_pixels}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _index_by_stem(files: dict[str, SourceFile]) -> dict[str, list[SourceFile]]:
    """Kinetics ids are unique, so a video is found by file name wherever it sits under the root."""
    index: dict[str, list[SourceFile]] = {}
    for rel, f in files.items():
        stem, ext = posixpath.splitext(posixpath.basename(rel))
        if ext.lower() in VIDEO_EXTENSIONS:
            index.setdefault(stem, []).append(f)
    return index


def plan_split(cfg: PipelineConfig, split: str, classes: list[str], files: dict[str, SourceFile],
               store: Storage) -> SplitPlan:
    rows = read_rows(cfg, split)
    mode = "train" if split == cfg.data.train_split else "eval"
    phash = prep_hash(cfg, classes, mode)
    state = manifest.DatasetState.load(store, manifest.manifest_dir(cfg.data.dataset, split, phash))
    plan = SplitPlan(split, mode, phash, rows_read=len(rows))
    index = _index_by_stem(files) if cfg.data.format == "kinetics_csv" else {}
    class_index = {name: i for i, name in enumerate(classes)}
    seen: set[str] = set()

    def quarantine(row: Row, reason: str, detail: str, f: SourceFile | None = None):
        plan.quarantined.append(manifest.VideoRecord(
            video_id=row.video_id, source=f.rel if f else (row.path or ""), size=f.size if f else 0,
            etag=f.etag if f else "", reason=reason, detail=f"{split} row {row.line}: {detail}"))

    for row in rows:
        if row.video_id in seen:
            quarantine(row, DUPLICATE_ROW, f"{row.video_id} already listed earlier in this split")
            continue
        seen.add(row.video_id)
        if row.label not in class_index:
            quarantine(row, UNKNOWN_LABEL, f"label {row.label!r} is not one of the {len(classes)} training classes")
            continue
        if row.path is not None:
            norm = posixpath.normpath(row.path)
            if posixpath.isabs(row.path) or norm == ".." or norm.startswith("../"):
                quarantine(row, PATH_ESCAPES_ROOT, f"{row.path!r} resolves outside the video root")
                continue
            found = files.get(norm)
        else:
            candidates = index.get(row.video_id, [])
            preferred = [f for f in candidates if f"/{row.label}/" in f"/{f.rel}"]
            found = (preferred or sorted(candidates, key=lambda f: f.rel) or [None])[0]
        if found is None:
            quarantine(row, MISSING_FILE, f"no file for {row.video_id} under {cfg.data.video_root}")
            continue
        if found.size == 0:
            quarantine(row, ZERO_BYTES, f"{found.rel} is empty (0 bytes)", found)
            continue
        plan.annotated_ids.add(row.video_id)
        if state.is_current(row.video_id, found.size, found.etag):
            plan.done += 1
            continue
        plan.todo.append(Task(row.video_id, class_index[row.label], found.rel, found.size, found.etag))
    return plan


@dataclass
class Plan:
    classes: list[str]
    splits: dict[str, SplitPlan]

    def summary(self) -> dict:
        return {"classes": len(self.classes), "splits": {s: p.summary() for s, p in self.splits.items()}}


def plan(cfg: PipelineConfig, store: Storage, splits: list[str] | None = None) -> Plan:
    """What preprocess has to do for each split, given the committed manifests."""
    source = VideoSource(cfg.data.video_root, S3Options(cfg.s3.endpoint_url, cfg.s3.region))
    files = source.list()
    classes = class_names(read_rows(cfg, cfg.data.train_split))
    if not classes:
        raise AnnotationError(f"{cfg.data.annotations[cfg.data.train_split]}: no labelled rows in the training "
                              "split; the class list comes from it")
    splits = splits or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    return Plan(classes, {s: plan_split(cfg, s, classes, files, store) for s in splits})


def task_dict(task: Task) -> dict:
    return asdict(task)
