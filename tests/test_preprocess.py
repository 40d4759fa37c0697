"""Preprocess through a real local Ray: every annotation row ends processed or quarantined with its
reason, re-runs decode only what is new, and a kill -9 mid-run loses and duplicates nothing."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.data import run_preprocess, storage_of
from slowfast.shards import manifest
from slowfast.shards.reader import iter_clips
from slowfast.video.synth import encode_video, render, sample_video

from conftest import REPO, pipeline_config
from stop_hook import stop_after, wait_stopped
from videos import encode_audio_only


def copy_set(synth_set: Path, dest: Path) -> Path:
    shutil.copytree(synth_set, dest)
    return dest


def add_rows(csv_path: Path, rows: list[tuple[str, str, int, int]], split: str) -> None:
    with open(csv_path, "a", newline="") as f:
        writer = csv.writer(f)
        for label, yid, start, end in rows:
            writer.writerow([label, yid, start, end, split])


def first_rows(csv_path: Path) -> list[dict]:
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def video_path(root: Path, split: str, label: str, yid: str, start=0, end=2) -> Path:
    path = root / split / label / f"{yid}_{start:06d}_{end:06d}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def clip_digests(cfg, split: str) -> dict[tuple[str, int], str]:
    """(video_id, clip_index) -> sha1 of its frames, over the committed, readable shards."""
    store = storage_of(cfg)
    sp_folder = store.list(f"manifests/{cfg.data.dataset}/{split}", suffix=".json")
    folder = sp_folder[0].rsplit("/", 1)[0]
    state = manifest.DatasetState.load(store, folder)
    out = {}
    for path, skip in state.readable():
        table = pq.read_table(store.path(path), filesystem=store.fs)
        for row in table.to_pylist():
            if row["video_id"] in skip:
                continue
            key = (row["video_id"], row["clip_index"])
            assert key not in out, f"clip {key} appears twice in the readable shards"
            frames = row["frames"]
            out[key] = hashlib.sha1(b"".join(frames) if isinstance(frames, list) else frames).hexdigest()
    return out


def test_every_row_is_processed_or_quarantined_with_its_reason(ray_local, synth_set, tmp_path):
    root = copy_set(synth_set, tmp_path / "videos")
    train_csv, val_csv = root / "annotations/train.csv", root / "annotations/val.csv"
    good = next(root.glob("train/*/*.mp4"))
    label = good.parent.name
    data = good.read_bytes()

    video_path(root, "train", label, "zerobytes00").write_bytes(b"")
    video_path(root, "train", label, "truncated00").write_bytes(data[: len(data) * 4 // 10])
    video_path(root, "train", label, "randombytes").write_bytes(np.random.default_rng(0).bytes(30_000))
    encode_audio_only(video_path(root, "train", label, "audioonly00"), seconds=1.5)
    corrupt = bytearray(data)
    mdat = corrupt.find(b"mdat")
    middle = mdat + (len(corrupt) - mdat) // 2
    corrupt[middle : middle + 2000] = np.random.default_rng(1).bytes(2000)
    video_path(root, "train", label, "corrupted00").write_bytes(bytes(corrupt))
    big = render(sample_video(0, 0, 0, width=320, height=240, seconds=1.5))
    encode_video(video_path(root, "train", label, "toolarge000"), big, 30)
    short = render(sample_video(0, 0, 1, width=128, height=96, seconds=0.5))  # 15 frames < one 32-frame clip
    encode_video(video_path(root, "train", label, "shortclip00"), short, 30)
    duplicate = first_rows(train_csv)[0]
    add_rows(
        train_csv,
        [
            (label, "missingfile", 0, 2),
            (label, "zerobytes00", 0, 2),
            (label, "truncated00", 0, 2),
            (label, "randombytes", 0, 2),
            (label, "audioonly00", 0, 2),
            (label, "corrupted00", 0, 2),
            (label, "toolarge000", 0, 2),
            (label, "shortclip00", 0, 2),
            (duplicate["label"], duplicate["youtube_id"], int(duplicate["time_start"]), int(duplicate["time_end"])),
        ],
        "train",
    )
    add_rows(val_csv, [("juggling balls", "unknownlbl0", 0, 2)], "val")

    cfg = pipeline_config(tmp_path, root, preprocess={"max_frame_pixels": 200 * 200})
    out = run_preprocess(cfg, log=lambda *_: None)
    train, val = out["splits"]["train"], out["splits"]["val"]

    assert train["quarantine_reasons"] == {
        "missing_file": 1,
        "zero_bytes": 1,
        "truncated": 1,
        "not_a_video": 1,
        "no_video_stream": 1,
        "decode_error": 1,
        "frame_too_large": 1,
        "duplicate_row": 1,
    }
    assert val["quarantine_reasons"] == {"unknown_label": 1}
    for s in (train, val):
        assert s["processed"] + s["quarantined"] == s["rows_read"]
    assert train["processed"] == 12 + 1 and train["short_videos"] == 1  # the short video is processed, flagged
    assert train["clips"] == 2 * train["processed"]

    report = list(csv.DictReader(open(train["quarantine_report"])))
    assert sorted(r["reason"] for r in report) == sorted(train["quarantine_reasons"])
    by_id = {r["video_id"]: r for r in report}
    assert by_id["audioonly00_000000_000002"]["reason"] == "no_video_stream"
    assert "320x240" in by_id["toolarge000_000000_000002"]["detail"]
    assert by_id["missingfile_000000_000002"]["path"] == ""

    store = storage_of(cfg)
    state = manifest.DatasetState.load(store, manifest.manifest_dir("synth", "train", train["prep_hash"]))
    assert state.videos["shortclip00_000000_000002"].short
    assert not state.videos[
        f"{duplicate['youtube_id']}_{int(duplicate['time_start']):06d}_{int(duplicate['time_end']):06d}"
    ].quarantined


def test_path_lists_quarantine_paths_that_escape_the_root(ray_local, synth_set, tmp_path):
    root = copy_set(synth_set, tmp_path / "videos")
    rows = first_rows(root / "annotations/train.csv")
    classes = sorted({r["label"] for r in rows})
    lines = []
    for r in rows:
        rel = next(root.glob(f"train/*/{r['youtube_id']}_*.mp4")).relative_to(root).as_posix()
        lines.append(f"{rel} {classes.index(r['label'])}")
    outside = tmp_path / "outside.mp4"
    shutil.copy(next(root.glob("train/*/*.mp4")), outside)
    lines += ["../outside.mp4 0", f"{outside} 1", "train/nothing/here.mp4 0", f"{lines[0].split()[0]} 1"]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text(f"{lines[0]}\n{lines[1].split()[0]} 7\n")

    cfg = pipeline_config(
        tmp_path,
        root,
        data={
            "dataset": "synth",
            "format": "path_label",
            "video_root": str(root),
            "annotations": {"train": str(root / "train.txt"), "val": str(root / "val.txt")},
        },
    )
    out = run_preprocess(cfg, log=lambda *_: None)
    assert out["splits"]["train"]["quarantine_reasons"] == {
        "path_escapes_root": 2,
        "missing_file": 1,
        "duplicate_row": 1,
    }
    assert out["splits"]["train"]["processed"] == len(rows)
    assert out["splits"]["val"]["quarantine_reasons"] == {"unknown_label": 1}
    assert out["classes"] == ["0", "1", "2", "3"]


def test_rerun_after_new_rows_decodes_only_the_new_videos(ray_local, synth_set, tmp_path):
    root = copy_set(synth_set, tmp_path / "videos")
    train_csv = root / "annotations/train.csv"
    all_rows = first_rows(train_csv)
    # Hold back one video of each of three classes (a new class would change the class list, and
    # with it every label index: that is a new preprocessing hash and a full re-decode).
    later = [all_rows[i] for i in (0, 3, 6)]
    keep = [r for r in all_rows if r not in later]
    with open(train_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    cfg = pipeline_config(tmp_path, root)

    first = run_preprocess(cfg, log=lambda *_: None)["splits"]["train"]
    assert first["decoded_now"] == len(keep)
    before = clip_digests(cfg, "train")

    again = run_preprocess(cfg, log=lambda *_: None)["splits"]["train"]
    assert again["decoded_now"] == 0 and again["already_committed"] == len(keep)

    add_rows(
        train_csv, [(r["label"], r["youtube_id"], int(r["time_start"]), int(r["time_end"])) for r in later], "train"
    )
    third = run_preprocess(cfg, log=lambda *_: None)["splits"]["train"]
    assert third["decoded_now"] == 3 and third["already_committed"] == len(keep)
    assert third["processed"] == len(all_rows)
    after = clip_digests(cfg, "train")
    assert len(after) == 2 * len(all_rows)
    assert {k: after[k] for k in before} == before  # the old clips are untouched

    # A changed source file (new size) is decoded again, and its stale clips are no longer readable.
    changed = next(root.glob(f"train/*/{keep[0]['youtube_id']}_*.mp4"))
    spec = sample_video(9, 1, 7, width=128, height=96, seconds=1.5)
    encode_video(changed, render(spec), 30)
    fourth = run_preprocess(cfg, log=lambda *_: None)["splits"]["train"]
    assert fourth["decoded_now"] == 1
    final = clip_digests(cfg, "train")
    assert len(final) == 2 * len(all_rows)
    vid = changed.stem
    assert final[(vid, 0)] != after[(vid, 0)]


def _run_cli(config_path: Path, cwd: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "preprocess", "--config", str(config_path)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def test_kill_9_mid_run_then_rerun_gives_the_same_clips_exactly_once(ray_local, synth_set, tmp_path):
    root = copy_set(synth_set, tmp_path / "videos")
    # One video per shard and one shard per commit; the driver stops itself after its third commit of the
    # train split's 12 videos and is killed there, with the decode actors still writing shards.
    cfg = pipeline_config(
        tmp_path,
        root,
        preprocess={"rows_per_shard": 2, "commit_every": 1, "eval_views": 2},
        evaluate={"temporal_views": 2},
    )
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(cfg.to_yaml())
    store = storage_of(cfg)

    env = stop_after(tmp_path, "slowfast.shards.manifest:commit", 3)
    proc = _run_cli(config_path, tmp_path, env=env, start_new_session=True)
    wait_stopped(proc, 240, "its third commit")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    committed = store.list("manifests/synth/train", suffix=".json")
    assert len(committed) == 3

    done = _run_cli(config_path, tmp_path)
    output = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, output[-3000:]
    clips = clip_digests(cfg, "train")
    assert len(clips) == 2 * 12  # every video once: no duplicate (checked per clip) and none missing

    # A clean run elsewhere (in this process, on the test session's Ray) cuts exactly the same clips.
    clean = pipeline_config(
        tmp_path / "clean",
        root,
        preprocess={"rows_per_shard": 2, "commit_every": 1, "eval_views": 2},
        evaluate={"temporal_views": 2},
    )
    run_preprocess(clean, log=lambda *_: None)
    assert clip_digests(clean, "train") == clips


def test_clips_from_s3_equal_clips_from_local_disk(ray_local, s3_endpoint, synth_set, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("videos", "pipeline"):
        s3.create_bucket(Bucket=bucket)
    for path in synth_set.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "videos", f"kinetics/{path.relative_to(synth_set).as_posix()}")

    local = pipeline_config(tmp_path / "local", synth_set)
    remote = pipeline_config(
        tmp_path,
        synth_set,
        storage_root="s3://pipeline/runs",
        s3={"endpoint_url": s3_endpoint},
        data={
            "dataset": "synth",
            "format": "kinetics_csv",
            "video_root": "s3://videos/kinetics",
            "annotations": {
                "train": "s3://videos/kinetics/annotations/train.csv",
                "val": "s3://videos/kinetics/annotations/val.csv",
            },
        },
    )
    out_local = run_preprocess(local, log=lambda *_: None)
    out_remote = run_preprocess(remote, log=lambda *_: None)
    assert out_remote["splits"]["train"]["shards"].startswith("s3://pipeline/runs/shards/")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="pipeline", Prefix="runs/")["Contents"]]
    assert any(k.endswith(".parquet") for k in keys) and any("/commit-" in k for k in keys)
    for split in ("train", "val"):
        assert out_remote["splits"][split]["prep_hash"] == out_local["splits"][split]["prep_hash"]
        assert clip_digests(remote, split) == clip_digests(local, split)

    # The reader streams the S3 shards into the same tensors.
    store = storage_of(remote)
    state = manifest.DatasetState.load(
        store, manifest.manifest_dir("synth", "val", out_remote["splits"]["val"]["prep_hash"])
    )
    batches = list(
        iter_clips(
            [(store.path(p), skip) for p, skip in state.readable()],
            mode="eval",
            batch_size=4,
            crop=32,
            filesystem=store.fs,
        )
    )
    assert sum(len(b["label"]) for b in batches) == 4 * 3 * 3  # 4 val videos x 3 views x 3 crops
    assert batches[0]["fast"].shape[1:] == (16, 32, 32, 3) and batches[0]["slow_index"].shape[1] == 4
