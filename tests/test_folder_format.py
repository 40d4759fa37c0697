"""data.format folder: a folder per class (split by path hash, or by split folders), on real PyAV-encoded
videos, local and on a real S3 endpoint; bad files end in quarantine as with annotation files."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines import ingest
from pipelines.config import DataSection
from pipelines.data import run_preprocess, storage_of
from pipelines.storage import SourceFile
from slowfast.video.synth import encode_video, render, sample_video

from conftest import pipeline_config
from videos import encode_audio_only

FOLDER = {"dataset": "mine", "format": "folder", "annotations": {}}


def folder_config(tmp: Path, root: str | Path, data: dict | None = None, **sections):
    return pipeline_config(tmp, Path("/unused"), data={**FOLDER, "video_root": str(root), **(data or {})}, **sections)


def by_class(synth_set: Path, dest: Path) -> dict[str, str]:
    """The synth set's 16 videos as <label>/<video>, one class's in a sub-folder (any depth below the label
    is fine); returns the relative path of each video -> its label."""
    out = {}
    for path in sorted(synth_set.glob("*/*/*.mp4")):
        label = path.parent.name
        rel = f"{label}/2024/{path.name}" if label == "bouncing" else f"{label}/{path.name}"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dest / rel)  # the planner only lists: hard links keep the copy cheap
        out[rel] = label
    return out


def split_of(plan: ingest.Plan) -> dict[str, str]:
    """video id -> split, over every row the plan read."""
    out = {}
    for sp in plan.splits.values():
        for vid in [t.video_id for t in sp.todo] + [q.video_id for q in sp.quarantined]:
            assert vid not in out, f"{vid} planned in two splits"
            out[vid] = sp.split
    return out


def test_a_folder_per_class_splits_by_path_hash(synth_set, tmp_path):
    root = tmp_path / "videos"
    videos = by_class(synth_set, root)
    (root / "notes.txt").write_text("where these came from\n")
    (root / "bouncing" / "labels.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0" * 8)
    (root / "bouncing" / "._clip.mp4").write_bytes(b"\0" * 8)  # macOS metadata beside a video
    shutil.copy(next(iter(root.rglob("*.mp4"))), root / "unsorted.mp4")
    cfg = folder_config(tmp_path, root, {"val_fraction": 0.4})  # 16 videos: 3 of them in val

    plan = ingest.plan(cfg, storage_of(cfg))
    assert (
        plan.classes
        == sorted(set(videos.values()))
        == ["bouncing", "scrolling up", "stripes drifting down", "stripes drifting up"]
    )
    assert plan.layout == "split by path hash, val_fraction 0.4"
    splits = split_of(plan)
    assert splits == {rel: ingest.hash_split(rel, cfg.data) for rel in videos}  # ids are the relative paths
    assert set(splits.values()) == {"train", "val"}
    for sp in plan.splits.values():
        assert sp.quarantined == [] and sp.done == 0
        for task in sp.todo:
            assert (task.rel, plan.classes[task.label]) == (task.video_id, videos[task.video_id])
            assert task.size == (root / task.rel).stat().st_size
    assert plan.summary()["ignored"] == {"hidden": 2, "not_a_video_extension": 2, "no_label_folder": 1}
    assert sorted(i.rel for i in plan.ignored if i.reason == "no_label_folder") == ["unsorted.mp4"]


def test_split_folders_give_the_videos_and_labels_of_the_kinetics_csvs(synth_set, tmp_path):
    # The synth set is <split>/<label>/<video> with its CSVs beside: both formats must plan the same work.
    kinetics = pipeline_config(tmp_path, synth_set)
    folder = folder_config(tmp_path, synth_set, {"dataset": "synth"})
    by_csv, by_folder = ingest.plan(kinetics, storage_of(kinetics)), ingest.plan(folder, storage_of(folder))
    assert by_folder.layout == "split folders train/, val/"
    assert by_folder.classes == by_csv.classes
    for split in ("train", "val"):
        csv_sp, folder_sp = by_csv.splits[split], by_folder.splits[split]
        assert folder_sp.prep_hash == csv_sp.prep_hash  # same clips, same shard folder
        assert sorted((t.rel, t.label, t.size) for t in folder_sp.todo) == sorted(
            (t.rel, t.label, t.size) for t in csv_sp.todo
        )
        assert all(t.video_id == t.rel and t.rel.startswith(f"{split}/") for t in folder_sp.todo)
    assert {i.reason for i in by_folder.ignored} == {"not_a_video_extension"}  # annotations/*.csv


def test_split_folders_validation_labels_come_from_training(synth_set, tmp_path):
    root = tmp_path / "videos"
    shutil.copytree(synth_set, root, copy_function=os.link)
    stray = next(root.glob("val/*/*.mp4"))
    (root / "val" / "juggling").mkdir()
    os.link(stray, root / "val" / "juggling" / "x.mp4")
    (root / "test" / "bouncing").mkdir(parents=True)
    os.link(stray, root / "test" / "bouncing" / "y.mp4")
    os.link(stray, root / "train" / "loose.mp4")
    cfg = folder_config(tmp_path, root)
    plan = ingest.plan(cfg, storage_of(cfg))
    assert "juggling" not in plan.classes and len(plan.classes) == 4
    (unknown,) = plan.splits["val"].quarantined
    assert (unknown.video_id, unknown.reason) == ("val/juggling/x.mp4", "unknown_label")
    assert unknown.detail == "val: label 'juggling' is not one of the 4 training classes"
    assert sorted((i.rel, i.reason) for i in plan.ignored if i.rel.endswith(".mp4")) == [
        ("test/bouncing/y.mp4", "outside_split_folders"),
        ("train/loose.mp4", "no_label_folder"),
    ]

    # Split folders without a validation folder: said at ingest, with the ways out.
    shutil.rmtree(root / "val")
    with pytest.raises(
        ingest.AnnotationError,
        match=r"no videos under val/<label>/; folders with videos: "
        r"test, train\. .*data.val_split.*data.val_fraction",
    ):
        ingest.plan(cfg, storage_of(cfg))


def test_layout_rules_on_listings():
    data = DataSection(**FOLDER, video_root="s3://bucket/videos")

    def listing(*rels):
        return ingest.read_folder({r: SourceFile(r, 1, "e") for r in rels}, data)

    flat = listing("cats/a.MP4", "cats/deep/er/b.webm", "dogs/c.avi", "dogs/c.mkv", "dogs/", "", "readme.md")
    rows = {r.video_id: r.label for split in flat.rows.values() for r in split}
    assert rows == {"cats/a.MP4": "cats", "cats/deep/er/b.webm": "cats", "dogs/c.avi": "dogs", "dogs/c.mkv": "dogs"}
    assert [(i.rel, i.reason) for i in flat.ignored] == [("readme.md", "not_a_video_extension")]
    # A label folder named like a split, without a label below it, does not make a split layout ...
    assert listing("train/a.mp4", "cats/b.mp4").classes == ["cats", "train"]
    # ... a folder below it does, and then it holds labels.
    split = listing("train/cats/a.mp4", "val/cats/b.mp4", "val/dogs/c.mp4")
    assert split.classes == ["cats"] and [r.video_id for r in split.rows["val"]] == ["val/cats/b.mp4", "val/dogs/c.mp4"]
    with pytest.raises(
        ingest.AnnotationError,
        match=r"s3://bucket/videos: no videos in label folders .*"
        r"1 files found, 1 passed over \(no_label_folder 1\)",
    ):
        listing("a.mp4")


def test_hash_split_honours_the_val_fraction_and_never_moves_a_video():
    data = DataSection(**FOLDER, video_root="v")
    paths = [f"class {i % 7}/clip_{i:04d}.mp4" for i in range(200)]
    splits = {p: ingest.hash_split(p, data) for p in paths}
    n_val = sum(s == "val" for s in splits.values())
    assert 0.14 <= n_val / 200 <= 0.26, n_val  # 0.2 +- 2 binomial standard deviations (0.028)
    more = [f"class {i % 9}/new_{i:04d}.mp4" for i in range(300)]
    again = {p: ingest.hash_split(p, data) for p in paths + more}
    assert {p: again[p] for p in paths} == splits
    wider = DataSection(**FOLDER, video_root="v", val_fraction=0.3)
    moved = {p for p in paths if ingest.hash_split(p, wider) != splits[p]}
    assert moved and all(splits[p] == "train" for p in moved)  # only train -> val


def test_adding_videos_and_classes_never_moves_an_existing_video(tmp_path):
    root = tmp_path / "videos"
    first = root / "a" / "v000.mp4"
    first.parent.mkdir(parents=True)
    encode_video(first, render(sample_video(0, 0, 0, width=64, height=48, seconds=0.3)), 30)

    def add(label: str, count: int, start: int = 0):
        for i in range(start, start + count):
            path = root / label / f"v{i:03d}.mp4"
            path.parent.mkdir(exist_ok=True)
            if not path.exists():
                os.link(first, path)

    add("a", 40)
    add("b", 40)
    cfg = folder_config(tmp_path, root)
    before = split_of(ingest.plan(cfg, storage_of(cfg)))
    assert len(before) == 80 and 8 <= sum(s == "val" for s in before.values()) <= 24

    add("a", 30, start=40)
    add("c", 30)  # a new class: a new class list, yet no video changes split
    after_plan = ingest.plan(cfg, storage_of(cfg))
    after = split_of(after_plan)
    assert len(after) == 140 and after_plan.classes == ["a", "b", "c"]
    assert {vid: after[vid] for vid in before} == before


@pytest.fixture
def folder_with_bad_files(synth_set, tmp_path) -> tuple[Path, dict[str, str]]:
    """Three classes of real videos as <label>/<video> (one of them Matroska) plus four files that cannot be
    decoded; returns the root and the relative path of each bad file -> the reason it must end with."""
    root = tmp_path / "videos"
    for label in ("bouncing", "scrolling up", "stripes drifting up"):
        (root / label).mkdir(parents=True)
        for path in sorted(synth_set.glob(f"*/{label}/*.mp4"))[:2]:
            os.link(path, root / label / path.name)
    encode_video(root / "bouncing" / "extra.mkv", render(sample_video(5, 3, 0, width=128, height=96, seconds=1.2)), 30)
    good = next((root / "bouncing").glob("*.mp4")).read_bytes()
    (root / "bouncing" / "empty.mp4").write_bytes(b"")
    (root / "scrolling up" / "cut.mp4").write_bytes(good[: len(good) * 4 // 10])
    (root / "scrolling up" / "noise.avi").write_bytes(np.random.default_rng(0).bytes(30_000))
    encode_audio_only(root / "stripes drifting up" / "voice.m4v", seconds=1.5)
    (root / "stripes drifting up" / "shot list.txt").write_text("not a video\n")
    bad = {
        "bouncing/empty.mp4": "zero_bytes",
        "scrolling up/cut.mp4": "truncated",
        "scrolling up/noise.avi": "not_a_video",
        "stripes drifting up/voice.m4v": "no_video_stream",
    }
    return root, bad


def quarantine_report(path: str) -> dict[str, tuple[str, str]]:
    """video_id -> (path, reason), from a split's quarantine.csv."""
    with open(path, newline="") as f:
        return {r["video_id"]: (r["path"], r["reason"]) for r in csv.DictReader(f)}


def test_bad_files_end_in_quarantine_and_new_videos_are_the_only_ones_decoded(
    ray_local, folder_with_bad_files, tmp_path
):
    root, bad = folder_with_bad_files
    cfg = folder_config(tmp_path, root, {"val_fraction": 0.5})
    assert {ingest.hash_split(rel, cfg.data) for rel in bad} == {"train", "val"}  # bad files in both splits
    out = run_preprocess(cfg, log=lambda *_: None)
    assert out["classes"] == ["bouncing", "scrolling up", "stripes drifting up"]
    splits = out["splits"]
    reasons: dict[str, str] = {}
    for split, s in splits.items():
        assert s["processed"] + s["quarantined"] == s["rows_read"]  # every video in exactly one place
        report = quarantine_report(s["quarantine_report"])
        assert all(vid == path for vid, (path, _) in report.items())  # the report says which file
        assert all(ingest.hash_split(vid, cfg.data) == split for vid in report)
        reasons.update({vid: reason for vid, (_, reason) in report.items()})
    assert reasons == bad  # the reasons the same files get under annotation files (tests/test_preprocess.py)
    assert sum(s["rows_read"] for s in splits.values()) == 7 + len(bad)
    assert sum(s["processed"] for s in splits.values()) == 7  # the .mkv among them
    assert sum(s["clips"] for s in splits.values()) == sum(
        s["processed"] * (2 if s["mode"] == "train" else 3) for s in splits.values()
    )

    again = run_preprocess(cfg, log=lambda *_: None)["splits"]
    assert all(s["decoded_now"] == 0 for s in again.values())

    new = "scrolling up/later/take 2.mp4"
    (root / new).parent.mkdir()
    encode_video(root / new, render(sample_video(5, 0, 4, width=128, height=96, seconds=1.2)), 30)
    third = run_preprocess(cfg, log=lambda *_: None)["splits"]
    home = ingest.hash_split(new, cfg.data)
    assert {split: s["decoded_now"] for split, s in third.items()} == {split: int(split == home) for split in third}
    assert third[home]["processed"] == splits[home]["processed"] + 1
    assert all(third[split]["prep_hash"] == splits[split]["prep_hash"] for split in third)


def test_s3_video_root_plans_and_decodes_like_the_local_folder(ray_local, s3_endpoint, synth_set, tmp_path):
    import boto3

    local = tmp_path / "videos"
    videos = by_class(synth_set, local)
    (local / "notes.txt").write_text("x\n")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="footage")
    for rel in [*videos, "notes.txt"]:
        s3.upload_file(str(local / rel), "footage", f"clips/{rel}")
    s3.put_object(Bucket="footage", Key="clips/bouncing/", Body=b"")  # the folder object a console creates

    on_disk = folder_config(tmp_path / "disk", local, {"val_fraction": 0.4})
    on_s3 = folder_config(
        tmp_path / "s3", "s3://footage/clips", {"val_fraction": 0.4}, s3={"endpoint_url": s3_endpoint}
    )
    disk_plan, s3_plan = ingest.plan(on_disk, storage_of(on_disk)), ingest.plan(on_s3, storage_of(on_s3))
    assert s3_plan.classes == disk_plan.classes
    assert [(i.rel, i.reason) for i in s3_plan.ignored] == [("notes.txt", "not_a_video_extension")]
    for split in ("train", "val"):
        assert [(t.video_id, t.label, t.size) for t in s3_plan.splits[split].todo] == [
            (t.video_id, t.label, t.size) for t in disk_plan.splits[split].todo
        ]
        assert s3_plan.splits[split].prep_hash == disk_plan.splits[split].prep_hash

    val = run_preprocess(on_s3, splits=["val"], log=lambda *_: None, plan=s3_plan)["splits"]["val"]
    assert val["processed"] == val["rows_read"] == len(s3_plan.splits["val"].todo) > 0
