"""Manifests: the commit log that makes shards visible, exactly once.

A preprocessing run writes shard files first, then commits a manifest listing them and the videos
they hold (or why a video was quarantined). Readers see only shards named by a committed manifest,
so a crash leaves at most invisible orphan files, and a re-run redoes only uncommitted videos.
Storage access goes through any object with read_bytes / write_bytes (atomic) / list.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Protocol

FORMAT_VERSION = 1


class Store(Protocol):
    def read_bytes(self, rel: str) -> bytes: ...
    def write_bytes(self, rel: str, data: bytes) -> str: ...
    def list(self, rel: str, suffix: str = "") -> list[str]: ...


@dataclass
class VideoRecord:
    """One annotation row's outcome: processed into clips in `shard`, or quarantined with a reason."""

    video_id: str
    source: str
    size: int
    etag: str
    label: int | None = None
    shard: str | None = None
    clips: int = 0
    short: bool = False  # shorter than one clip: indices clamped, frames repeat (as the reference)
    reason: str | None = None  # set when quarantined
    detail: str | None = None

    @property
    def quarantined(self) -> bool:
        return self.reason is not None


@dataclass
class Commit:
    run_id: str
    videos: list[VideoRecord]
    shards: list[dict] = field(default_factory=list)  # {"path", "rows", "bytes"}
    committed_at: float = 0.0
    name: str = ""


def manifest_dir(dataset: str, split: str, prep_hash: str) -> str:
    return f"manifests/{dataset}/{split}/{prep_hash}"


def shard_dir(dataset: str, split: str, prep_hash: str) -> str:
    return f"shards/{dataset}/{split}/{prep_hash}"


def commit(store: Store, folder: str, run_id: str, videos: list[VideoRecord], shards: list[dict]) -> str:
    """Write one manifest atomically; from this moment its shards are visible. Returns its path."""
    now = time.time()
    name = (
        f"commit-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{int(now * 1e6) % 10**6:06d}-"
        f"{uuid.uuid4().hex[:8]}.json"
    )
    body = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "committed_at": now,
        "shards": shards,
        "videos": [asdict(v) for v in videos],
    }
    return store.write_bytes(f"{folder}/{name}", json.dumps(body, indent=1).encode())


def load_commits(store: Store, folder: str) -> list[Commit]:
    commits = []
    for rel in store.list(folder, suffix=".json"):
        body = json.loads(store.read_bytes(rel))
        if body.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{rel}: manifest format {body.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}; re-run preprocess into a new storage_root"
            )
        commits.append(
            Commit(
                run_id=body["run_id"],
                committed_at=body["committed_at"],
                shards=body["shards"],
                videos=[VideoRecord(**v) for v in body["videos"]],
                name=rel,
            )
        )
    return sorted(commits, key=lambda c: (c.committed_at, c.name))


@dataclass
class DatasetState:
    """The union of committed manifests: the newest record per video wins."""

    videos: dict[str, VideoRecord]
    shards: dict[str, dict]

    @classmethod
    def load(cls, store: Store, folder: str) -> DatasetState:
        videos: dict[str, VideoRecord] = {}
        shards: dict[str, dict] = {}
        for c in load_commits(store, folder):
            for s in c.shards:
                shards[s["path"]] = s
            for v in c.videos:
                videos[v.video_id] = v
        return cls(videos, shards)

    def is_current(self, video_id: str, size: int, etag: str) -> bool:
        """Already committed from the same source bytes: nothing to redo."""
        rec = self.videos.get(video_id)
        return rec is not None and rec.size == size and rec.etag == etag

    def readable(self, video_ids: set[str] | None = None) -> list[tuple[str, set[str]]]:
        """(shard path, video ids to skip in it) for the processed videos in `video_ids` (default all).

        A video re-processed after its source changed has stale clips in an older shard; those,
        and videos no longer annotated, are skipped by id.
        """
        wanted: dict[str, set[str]] = {}
        for vid, rec in self.videos.items():
            if rec.shard and not rec.quarantined and (video_ids is None or vid in video_ids):
                wanted.setdefault(rec.shard, set()).add(vid)
        out = []
        for path, keep in sorted(wanted.items()):
            listed = set(self.shards.get(path, {}).get("videos", keep))
            out.append((path, listed - keep))
        return out

    def counts(self) -> dict[str, int]:
        processed = sum(1 for v in self.videos.values() if not v.quarantined)
        return {
            "processed": processed,
            "quarantined": len(self.videos) - processed,
            "clips": sum(v.clips for v in self.videos.values()),
            "shards": len(self.shards),
        }
