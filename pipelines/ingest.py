"""Ingest: read annotations (or a folder per class), match them to the videos on disk or S3, and plan
what to decode.

Every annotation row (with data.format folder: every video found) ends in exactly one place: already
committed, to be decoded now, or quarantined here with a reason (unknown label, path outside the video
root, duplicate row, missing file, zero bytes). Decode-time reasons are added by preprocess.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

from slowfast.shards import manifest
from slowfast.shards.schema import FORMAT_VERSION

from .config import DataSection, PipelineConfig
from .errors import PipelineError
from .storage import S3Options, SourceFile, Storage, VideoSource, is_s3, s3_options, split_s3

# Plan-time quarantine reasons (decode-time ones live in slowfast.video.decode.REASONS).
UNKNOWN_LABEL = "unknown_label"
PATH_ESCAPES_ROOT = "path_escapes_root"
DUPLICATE_ROW = "duplicate_row"
MISSING_FILE = "missing_file"
ZERO_BYTES = "zero_bytes"

# Containers FFmpeg (and so PyAV) reads; with data.format folder, files with other extensions are
# listed in Plan.ignored rather than decoded.
VIDEO_EXTENSIONS = (
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".mpg",
    ".mpeg",
    ".flv",
    ".wmv",
    ".3gp",
    ".ogv",
    ".ts",
    ".mts",
    ".m2ts",
)

# Why a file under a folder-format video root is not a video of the dataset.
HIDDEN = "hidden"  # a dot-file or inside a dot-folder (.DS_Store, ._clip.mp4, .cache/)
NOT_A_VIDEO = "not_a_video_extension"
NO_LABEL_FOLDER = "no_label_folder"  # directly under video_root (or under a split folder)
OUTSIDE_SPLITS = "outside_split_folders"  # the root has split folders, this file is in none of them


class AnnotationError(PipelineError, ValueError):
    """An annotation file that cannot be read at all (as opposed to single bad rows, which are quarantined)."""


@dataclass
class Row:
    """One annotation row, as read: the video it names, its label and (path lists, folders) its path."""

    line: int | None  # None for the folder format: the row is the file itself
    video_id: str
    label: str
    path: str | None = None  # Kinetics rows have none: they are found by video id


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
    mode: str  # "train" (random clips) or "eval" (uniform views)
    prep_hash: str
    rows_read: int
    todo: list[Task] = field(default_factory=list)
    done: int = 0  # committed earlier from the same bytes (processed or quarantined)
    quarantined: list[manifest.VideoRecord] = field(default_factory=list)
    annotated_ids: set[str] = field(default_factory=set)

    def summary(self) -> dict:
        return {
            "split": self.split,
            "rows_read": self.rows_read,
            "to_decode": len(self.todo),
            "already_committed": self.done,
            "quarantined_at_plan": dict(Counter(q.reason for q in self.quarantined)),
        }


def read_text(location: str, s3: S3Options) -> str:
    if is_s3(location):
        bucket, key = split_s3(location)
        store = Storage(f"s3://{bucket}", s3)
        return store.read_bytes(key).decode("utf-8-sig")
    try:
        with open(location, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise AnnotationError(
            f"{location}: annotation file not found; set data.annotations.<split> "
            "to a Kinetics CSV or a 'path label' list"
        ) from None


def parse_kinetics_csv(text: str, source: str) -> list[Row]:
    """Official Kinetics 400/600/700 CSVs: label,youtube_id,time_start,time_end,split[,is_cc]."""
    reader = csv.DictReader(io.StringIO(text))
    needed = {"youtube_id", "time_start", "time_end"}
    if not reader.fieldnames or not needed <= set(reader.fieldnames):
        raise AnnotationError(
            f"{source}: not a Kinetics CSV: header {reader.fieldnames}, expected "
            "label,youtube_id,time_start,time_end,split; for '<path> <label>' lists set "
            "data.format: path_label"
        )
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
    text = read_text(location, s3_options(cfg.s3))
    parse = parse_kinetics_csv if cfg.data.format == "kinetics_csv" else parse_path_label
    return parse(text, location)


def class_names(rows: list[Row]) -> list[str]:
    """The class list, from the training annotations: sorted names (integers sorted numerically)."""
    labels = {r.label for r in rows if r.label}
    if labels and all(label.isdigit() for label in labels):
        return [str(i) for i in range(max(int(label) for label in labels) + 1)]
    return sorted(labels)


@dataclass
class Ignored:
    """A file under a folder-format video root that is not one of the dataset's videos, and why."""

    rel: str
    reason: str


@dataclass
class Listing:
    """What the labels say: the class list, each split's rows, and (folder format) the files passed over."""

    classes: list[str]
    rows: dict[str, list[Row]]
    layout: str
    ignored: list[Ignored] = field(default_factory=list)


def hash_position(rel: str) -> float:
    """Where a path falls in [0, 1): from the path alone, so no other file, run or machine changes it."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(rel: str, data: DataSection) -> str:
    """The split of a video of a folder without split folders. A video stays in its split when videos are
    added or removed; raising data.val_fraction only moves videos from train to val."""
    return data.val_split if hash_position(rel) < data.val_fraction else data.train_split


def video_paths(files: dict[str, SourceFile]) -> tuple[list[list[str]], list[Ignored]]:
    """The videos' paths (as lists of parts) by extension, and the other files with the reason."""
    videos, ignored = [], []
    for rel in sorted(files):
        if not rel or rel.endswith("/"):
            continue  # an S3 "folder" marker object, not a file
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts):
            ignored.append(Ignored(rel, HIDDEN))
        elif posixpath.splitext(rel)[1].lower() not in VIDEO_EXTENSIONS:
            ignored.append(Ignored(rel, NOT_A_VIDEO))
        else:
            videos.append(parts)
    return videos, ignored


def read_folder(files: dict[str, SourceFile], data: DataSection) -> Listing:
    """data.format folder: `<label>/.../<video>`, or `<split>/<label>/.../<video>` when a folder named
    data.train_split or data.val_split at the top holds label folders. A video's id is its path under the
    root, extension included: unique (two files cannot share a path), stable, and the way back to the file."""
    splits = (data.train_split, data.val_split)
    videos, ignored = video_paths(files)
    by_split = any(len(parts) > 2 and parts[0] in splits for parts in videos)
    rows: dict[str, list[Row]] = {split: [] for split in splits}
    for parts in videos:
        rel = "/".join(parts)
        if by_split and parts[0] not in splits:
            ignored.append(Ignored(rel, OUTSIDE_SPLITS))
            continue
        label_at = 1 if by_split else 0
        if len(parts) < label_at + 2:
            ignored.append(Ignored(rel, NO_LABEL_FOLDER))
            continue
        split = parts[0] if by_split else hash_split(rel, data)
        rows[split].append(Row(None, rel, parts[label_at], path=rel))
    if by_split:
        missing = [split for split in splits if not rows[split]]
        if missing:
            tops = sorted({parts[0] for parts in videos if len(parts) > 1})
            raise AnnotationError(
                f"{data.video_root}: has split folders (data.format folder) but no videos under "
                f"{', '.join(f'{m}/<label>/' for m in missing)}; folders with videos: {', '.join(tops)}. Add them, "
                "set data.train_split / data.val_split to your folders' names, or drop the split folders "
                "(<label>/<video>) to split by path hash with data.val_fraction"
            )
        layout = f"split folders {data.train_split}/, {data.val_split}/"
        labelled = rows[data.train_split]  # as with annotations, the training split defines the classes
    else:
        layout = f"split by path hash, val_fraction {data.val_fraction:g}"
        labelled = [row for split_rows in rows.values() for row in split_rows]
    classes = sorted({row.label for row in labelled})
    if not classes:
        raise AnnotationError(
            f"{data.video_root}: no videos in label folders (data.format folder expects <label>/<video> or "
            f"<{data.train_split}>/<label>/<video>, videos named *{', *'.join(VIDEO_EXTENSIONS)}); "
            f"{len(files)} files found, {len(ignored)} passed over "
            f"({', '.join(f'{k} {n}' for k, n in Counter(i.reason for i in ignored).items())})"
        )
    return Listing(classes, rows, layout, ignored)


def read_annotations(cfg: PipelineConfig, splits: list[str]) -> Listing:
    """Kinetics CSVs or path lists: the rows of each split, and the class list from the training rows."""
    rows = {split: read_rows(cfg, split) for split in dict.fromkeys([cfg.data.train_split, *splits])}
    classes = class_names(rows[cfg.data.train_split])
    if not classes:
        raise AnnotationError(
            f"{cfg.data.annotations[cfg.data.train_split]}: no labelled rows in the training "
            "split; the class list comes from it"
        )
    return Listing(classes, rows, f"annotations ({cfg.data.format})")


def prep_hash(cfg: PipelineConfig, classes: list[str], mode: str) -> str:
    """Everything that changes the clips in a shard; new hash, new shard folder."""
    p, m = cfg.preprocess, cfg.model
    key = {
        "format": FORMAT_VERSION,
        "mode": mode,
        "classes": classes,
        "T": m.T,
        "tau": m.tau,
        "alpha": m.alpha,
        "target_fps": p.target_fps,
        "short_side": p.short_side,
        "frame_format": p.frame_format,
        "jpeg_quality": p.jpeg_quality if p.frame_format == "jpeg" else None,
        "seed": p.seed,
        "clips": p.clips_per_video if mode == "train" else p.eval_views,
        "max_frame_pixels": p.max_frame_pixels,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _index_by_stem(files: dict[str, SourceFile]) -> dict[str, list[SourceFile]]:
    """Kinetics ids are unique, so a video is found by file name wherever it sits under the root."""
    index: dict[str, list[SourceFile]] = {}
    for rel, f in files.items():
        stem, ext = posixpath.splitext(posixpath.basename(rel))
        if ext.lower() in VIDEO_EXTENSIONS:
            index.setdefault(stem, []).append(f)
    return index


def plan_split(
    cfg: PipelineConfig,
    split: str,
    rows: list[Row],
    classes: list[str],
    files: dict[str, SourceFile],
    store: Storage,
    retry_quarantined: frozenset[str] = frozenset(),
) -> SplitPlan:
    mode = "train" if split == cfg.data.train_split else "eval"
    phash = prep_hash(cfg, classes, mode)
    state = manifest.DatasetState.load(store, manifest.manifest_dir(cfg.data.dataset, split, phash))
    plan = SplitPlan(split, mode, phash, rows_read=len(rows))
    index = _index_by_stem(files) if cfg.data.format == "kinetics_csv" else {}
    class_index = {name: i for i, name in enumerate(classes)}
    seen: set[str] = set()

    def quarantine(row: Row, reason: str, detail: str, f: SourceFile | None = None):
        where = split if row.line is None else f"{split} row {row.line}"
        plan.quarantined.append(
            manifest.VideoRecord(
                video_id=row.video_id,
                source=f.rel if f else (row.path or ""),
                size=f.size if f else 0,
                etag=f.etag if f else "",
                reason=reason,
                detail=f"{where}: {detail}",
            )
        )

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
        if (
            state.is_current(row.video_id, found.size, found.etag)
            and state.videos[row.video_id].reason not in retry_quarantined
        ):
            plan.done += 1
            continue
        plan.todo.append(Task(row.video_id, class_index[row.label], found.rel, found.size, found.etag))
    return plan


@dataclass
class Plan:
    classes: list[str]
    splits: dict[str, SplitPlan]
    layout: str = ""
    ignored: list[Ignored] = field(default_factory=list)

    def summary(self) -> dict:
        out = {
            "classes": len(self.classes),
            "layout": self.layout,
            "splits": {s: p.summary() for s, p in self.splits.items()},
        }
        if self.ignored:
            out["ignored"] = dict(Counter(i.reason for i in self.ignored))
            out["ignored_examples"] = [i.rel for i in self.ignored[:5]]
        return out


def plan(
    cfg: PipelineConfig,
    store: Storage,
    splits: list[str] | None = None,
    retry_quarantined: frozenset[str] = frozenset(),
) -> Plan:
    """What preprocess has to do for each split, given the committed manifests. Videos committed as quarantined
    with a reason in `retry_quarantined` are decoded again (e.g. after a decoder upgrade)."""
    source = VideoSource(cfg.data.video_root, s3_options(cfg.s3))
    files = source.list()
    splits = splits or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    if cfg.data.format == "folder":
        listing = read_folder(files, cfg.data)
        unknown = [s for s in splits if s not in listing.rows]
        if unknown:
            raise AnnotationError(
                f"split {', '.join(unknown)}: data.format folder has only the splits "
                f"{cfg.data.train_split} and {cfg.data.val_split} (data.train_split, data.val_split)"
            )
    else:
        listing = read_annotations(cfg, splits)
    return Plan(
        listing.classes,
        {s: plan_split(cfg, s, listing.rows[s], listing.classes, files, store, retry_quarantined) for s in splits},
        listing.layout,
        listing.ignored,
    )
