"""Batch inference on Ray Data (`pipelines infer`): a folder, a list file and an s3:// prefix scored with a real
registered model on a real Ray instance; results equal predict's for the same videos; bad videos quarantined with
preprocess's reasons; a re-run scores only what is new; a run killed with SIGKILL resumes exactly once."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import infer, tracking
from pipelines.cli import main
from pipelines.infer import Gatherer, run_infer
from pipelines.infer_out import InferError, Job, read_predictions, read_windows
from pipelines.storage import S3Options
from slowfast.video import synth

from conftest import REPO
from stop_hook import stop_after, wait_stopped


def videos_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.mp4"))


def read(out: Path, folder: str = "predictions"):
    """What a user reads from --out: each video's latest committed rows."""
    table = read_predictions(str(out)) if folder == "predictions" else read_windows(str(out))
    return table.to_pandas()


def test_a_folder_is_scored_as_predict_scores_it_and_a_rerun_scores_only_new_videos(ray_local, infer_model, synth_set):
    cfg, uri, tmp = infer_model
    folder = tmp / "bucket-of-videos"
    shutil.copytree(synth_set / "val", folder)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    (folder / "empty.mkv").write_bytes(b"")
    (folder / "notes.txt").write_text("not a video file: passed over")
    out = tmp / "scores"
    lines: list[str] = []
    job = Job(top_k=3, windows=True, stride_s=0.5, embeddings=True)
    s = run_infer(cfg, uri, str(folder), str(out), job, log=lines.append)
    assert (s["scored_now"], s["quarantined_now"]) == (4, 2)
    assert s["score_cpu_s"] > s["cut_cpu_s"] > 0  # each task's own CPU time, summed

    predictions = read(out)
    classifier = tracking.load_registered(cfg, uri)
    expected = {str(v): classifier.predict([v], top_k=3)[0] for v in videos_of(synth_set / "val")}
    assert sorted(predictions["video"]) == sorted(
        str(folder / Path(v).relative_to(synth_set / "val")) for v in expected
    )
    for row in predictions.itertuples():
        want = expected[str(synth_set / "val" / Path(row.video).relative_to(folder))]
        assert list(row.labels) == want["labels"]
        assert np.allclose(row.scores, want["scores"], atol=1e-5)
        assert row.views == 6
    # The embedding is the pooled features before the classifier, averaged over the test views.
    video = predictions["video"][0]
    fast, slow = classifier.spec.cut_views(video)
    _, features = classifier.score(fast, slow, features=True)
    assert np.allclose(predictions["embedding"][0], features.mean(0), atol=1e-5)
    assert len(predictions["embedding"][0]) == classifier.model.head.fc.in_features

    windows = read(out, "windows")
    timeline = classifier.timeline(video, window_s=None, stride_s=0.5, top_k=3)
    mine = windows[windows["video"] == video].sort_values("window")
    assert [w["start_s"] for w in timeline["windows"]] == list(mine["start_s"])
    assert [w["labels"] for w in timeline["windows"]] == [list(x) for x in mine["labels"]]

    quarantine = (out / "quarantine.csv").read_text().splitlines()
    assert quarantine[0] == "video,reason,detail"
    reasons = {line.split(",")[0]: line.split(",")[1] for line in quarantine[1:]}
    assert reasons == {str(folder / "broken.mp4"): "not_a_video", str(folder / "empty.mkv"): "zero_bytes"}

    # Again: nothing to do. Then one new video: only it is scored.
    again = run_infer(cfg, uri, str(folder), str(out), job, log=lines.append)
    assert (again["scored_now"], again["quarantined_now"]) == (0, 0)
    new = folder / "late" / "new.mp4"
    new.parent.mkdir()
    shutil.copy(videos_of(synth_set / "train")[0], new)
    more = run_infer(cfg, uri, str(folder), str(out), job, log=lines.append)
    assert more["scored_now"] == 1 and more["scored_total"] == 5
    assert sorted(read(out)["video"]).count(str(new)) == 1 and len(read(out)) == 5

    # The folder holds one model's results under one job.
    with pytest.raises(InferError, match="holds results of .* other job"):
        run_infer(cfg, uri, str(folder), str(out), Job(top_k=2), log=lines.append)


def test_a_list_file_and_s3_in_and_out(ray_local, infer_model, synth_set, s3_endpoint):
    cfg, uri, tmp = infer_model
    cfg = cfg.model_copy(update={"s3": cfg.s3.model_copy(update={"endpoint_url": s3_endpoint})})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="clips")
    local = videos_of(synth_set / "val")
    for v in local[:2]:
        s3.upload_file(str(v), "clips", f"incoming/{v.name}")
    listing = tmp / "list.txt"
    rel = os.path.relpath(local[3], listing.parent)
    listing.write_text(
        f"# two local, one on S3, one missing\n{local[2]}\n{rel}\n\ns3://clips/incoming/{local[0].name}\n"
        f"{tmp / 'gone.mp4'}\n"
    )
    s = run_infer(cfg, uri, str(listing), "s3://clips/scores", Job(top_k=1), log=lambda *_: None)
    assert (s["scored_now"], s["quarantined_now"]) == (3, 1)
    objects = [o["Key"] for o in s3.list_objects_v2(Bucket="clips", Prefix="scores/")["Contents"]]
    assert any(k.startswith("scores/predictions/part-") for k in objects) and "scores/quarantine.csv" in objects
    body = s3.get_object(Bucket="clips", Key="scores/quarantine.csv")["Body"].read().decode()
    assert f"{tmp / 'gone.mp4'},missing_file," in body

    s3.put_object(Bucket="clips", Key="incoming/truncated.mp4", Body=local[1].read_bytes()[:2000])
    prefix = run_infer(cfg, uri, "s3://clips/incoming", "s3://clips/scores-2", Job(top_k=1), log=lambda *_: None)
    assert (prefix["scored_now"], prefix["quarantined_now"]) == (2, 1)
    summary = json.loads(s3.get_object(Bucket="clips", Key="scores-2/summary.json")["Body"].read())
    assert (summary["scored_total"], summary["quarantined_total"]) == (2, 1)
    body = s3.get_object(Bucket="clips", Key="scores-2/quarantine.csv")["Body"].read().decode()
    assert body.splitlines()[1].startswith("s3://clips/incoming/truncated.mp4,")
    # The S3 scores equal the local ones of the same video (predict's, by the first test).
    scored = read_predictions("s3://clips/scores-2", S3Options(s3_endpoint))
    row = scored.to_pandas().set_index("video").loc[f"s3://clips/incoming/{local[0].name}"]
    want = tracking.load_registered(cfg, uri).predict([local[0]], top_k=1)[0]
    assert list(row["labels"]) == want["labels"] and np.allclose(row["scores"], want["scores"], atol=1e-5)


@pytest.mark.heavy
def test_killed_mid_run_resumes_exactly_once(infer_model, synth_set):
    """SIGKILL to the whole `pipelines infer` process group right after its first commit; the same command then
    scores exactly the videos that were not committed, and no uncommitted file is left."""
    cfg, uri, tmp = infer_model
    folder = tmp / "kill-videos"
    for i, v in enumerate(videos_of(synth_set)):
        target = folder / f"{i:02d}-{v.name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(v, target)
    config = tmp / "infer.yaml"
    config.write_text(cfg.to_yaml())
    out = tmp / "killed"
    cmd = [
        sys.executable,
        "-m",
        "pipelines",
        "infer",
        "--config",
        str(config),
        "--model-uri",
        uri,
        "--videos",
        str(folder),
        "--out",
        str(out),
        "--set",
        "infer.batch_videos=1",
        "--set",
        "infer.workers=1",
    ]
    # The driver stops itself right after its first commit and is killed there.
    env = stop_after(tmp, "slowfast.shards.manifest:commit", 1)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_stopped(proc, 240, "its first commit")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {
        v["video_id"] for c in (out / "manifests").glob("commit-*.json") for v in json.loads(c.read_text())["videos"]
    }
    total = len(videos_of(folder))
    assert 0 < len(first) < total, f"{len(first)} of {total} committed when killed"
    assert sorted(read(out)["video"]) == sorted(first)  # a reader sees the committed videos, once each

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{total - len(first)} to score, {len(first)} already scored" in done.stdout
    assert "(0 videos)" in done.stdout.splitlines()[-1]  # the summary's quarantine line
    predictions = read(out)
    assert sorted(predictions["video"]) == sorted(str(v) for v in videos_of(folder))  # each exactly once
    committed = {json.loads(c.read_text())["shards"][0]["path"] for c in (out / "manifests").glob("commit-*.json")}
    assert {p.stem for p in (out / "predictions").glob("*.parquet")} == committed  # no uncommitted part left


# A timeline of a synth video (1.5 s, clips of 16 frames at 30 fps: 0.533 s) every 0.25 s: 5 windows of one clip, after
# the 2 test clips: in chunks of at most 2 clips, 1 chunk of test views and 3 of windows' views.
TIMELINE = Job(top_k=3, windows=True, stride_s=0.25, embeddings=True)


def with_infer(cfg, **infer_keys):
    return cfg.model_copy(update={"infer": cfg.infer.model_copy(update=infer_keys)})


def rows_of(windows) -> list[tuple]:
    return [(w.video, w.window, w.start_s, w.end_s, list(w.labels), list(w.scores)) for w in windows.itertuples()]


def test_a_timeline_cut_in_chunks_of_2_clips_scores_as_in_one_chunk_and_each_video_commits_once(
    ray_local, infer_model, synth_set, monkeypatch
):
    """Each video's 7 clips cut and scored 2 at a time (4 chunks, one per scoring call, so that a video's chunks reach
    the driver in separate batches) give the predictions, embeddings and windows of all the windows in one chunk,
    bit for bit (the chunks are whole scoring batches), and predict's; each video is committed once, in one part."""
    cfg, uri, tmp = infer_model
    arrivals: list[list[tuple[str, int]]] = []
    gather = Gatherer.add

    def add(self, rows):
        arrivals.append([(r["video"], int(r["chunk"])) for r in rows])
        return gather(self, rows)

    monkeypatch.setattr(Gatherer, "add", add)
    # Each chunk its own block, as one at crop 224 (138 MiB) is against the default 128 MiB: these are 0.3 MiB.
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "target_max_block_size", 4096)
    read_back = {}
    for chunk_clips in (2, 1000):
        arrivals.clear()
        out = tmp / f"chunks-{chunk_clips}"
        s = run_infer(
            with_infer(cfg, chunk_clips=chunk_clips, batch_videos=1),
            uri,
            str(synth_set / "val"),
            str(out),
            TIMELINE,
            log=lambda *_: None,
        )
        assert (s["scored_now"], s["views_now"]) == (4, 4 * 6)
        read_back[chunk_clips] = (read(out).sort_values("video"), read(out, "windows"))
        batches_of = {}
        for k, batch in enumerate(arrivals):
            for video, chunk in batch:
                batches_of.setdefault(video, {})[chunk] = k
        assert {len(chunks) for chunks in batches_of.values()} == {4 if chunk_clips == 2 else 2}
        if chunk_clips == 2:
            assert all(len(set(chunks.values())) > 1 for chunks in batches_of.values()), arrivals
        committed = [
            v["video_id"]
            for c in (out / "manifests").glob("commit-*.json")
            for v in json.loads(c.read_text())["videos"]
        ]
        assert sorted(committed) == sorted(batches_of)  # each video in one commit record, once
        assert len(pq.read_table(out / "predictions")) == 4 and len(pq.read_table(out / "windows")) == 4 * 5

    (chunked, chunked_windows), (whole, whole_windows) = read_back[2], read_back[1000]
    assert list(chunked["video"]) == list(whole["video"])
    for a, b in zip(chunked.itertuples(), whole.itertuples(), strict=True):
        assert (list(a.labels), list(a.scores), a.views) == (list(b.labels), list(b.scores), b.views)
        assert np.array_equal(a.embedding, b.embedding)
    assert rows_of(chunked_windows) == rows_of(whole_windows)

    classifier = tracking.load_registered(cfg, uri)
    video = chunked["video"].iloc[0]
    assert list(chunked["labels"].iloc[0]) == classifier.predict([video], top_k=3)[0]["labels"]
    timeline = classifier.timeline(video, stride_s=0.25, top_k=3)["windows"]
    mine = chunked_windows[chunked_windows["video"] == video]
    assert [w["labels"] for w in timeline] == [list(x) for x in mine["labels"]]
    assert np.allclose([w["scores"] for w in timeline], np.stack(mine["scores"]), atol=1e-5)


def test_a_videos_chunks_are_gathered_in_any_order_between_another_videos(ray_local, infer_model, synth_set, tmp_path):
    """The driver's `Gatherer` fed two videos' scored chunks (real cuts, a real Score) shuffled together, three at a
    time: each video's row comes with its last chunk and equals the row of its chunks in order. A video whose cut
    fails after some chunks is its failure row, its chunks arriving later are dropped; one whose chunks are not all
    in at the end is unread (never committed)."""
    cfg, uri, _ = infer_model
    loaded = tracking.load_registered(cfg, uri)
    spec, job = asdict(loaded.spec), asdict(TIMELINE)
    packed = infer.pack_model(loaded.model, class_names=loaded.class_names, spec=spec, batch_views=loaded.spec.views)
    score = infer.Score([ray_local.put(packed)], job, use_gpu=False, threads=1, mixed_precision=False)

    def scored(video: str, file: Path) -> list[dict]:
        task = {"video": [video], "root": [str(file.parent)], "rel": [file.name], "size": [1], "etag": ["e"]}
        out = [score(batch) for batch in infer.cut_views(task, spec, job, S3Options(), chunk_clips=2)]
        return [{k: batch[k][0] for k in batch} for batch in out]

    first, second = (str(v) for v in videos_of(synth_set / "val")[:2])
    rows = scored(first, Path(first)) + scored(second, Path(second))
    assert len(rows) == 8
    in_order = {r["video"]: r for r in Gatherer(loaded, job=TIMELINE).add(rows)}
    shuffled = random.Random(0).sample(rows, len(rows))
    gatherer, got = Gatherer(loaded, job=TIMELINE), {}
    for k in range(0, len(shuffled), 3):
        for row in gatherer.add(shuffled[k : k + 3]):
            last = max(i for i, r in enumerate(shuffled) if r["video"] == row["video"])
            assert k <= last < k + 3  # handed on with its last chunk
            got[row["video"]] = row
    assert sorted(got) == sorted(in_order) and not gatherer.held
    for video, row in got.items():
        for key in ("reason", "views", "labels", "scores", "embedding", "windows"):
            assert row[key] == in_order[video][key], key

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"no longer a video")
    (failed,) = scored(first, garbage)
    assert failed["reason"] == "not_a_video"
    mine = [r for r in rows if r["video"] == first]
    gatherer = Gatherer(loaded, job=TIMELINE)
    assert gatherer.add(mine[:2]) == []
    (row,) = gatherer.add([failed])
    assert (row["video"], row["reason"], row["labels"]) == (first, "not_a_video", "[]")
    assert gatherer.add(mine[2:]) == [] and not gatherer.held
    assert gatherer.add([r for r in rows if r["video"] == second][:3]) == []
    (lost,) = gatherer.unfinished()
    assert (lost["video"], lost["reason"], lost["detail"]) == (second, "unexpected_error", "3 of 4 chunks scored")


def test_a_timeline_over_the_limits_is_committed_as_such_and_the_flags_raise_them(
    ray_local, infer_model, synth_set, tmp_path, capsys
):
    """--max-windows 3: a 4 s video's 8 windows every 0.5 s are refused before decoding, committed as timeline_limit
    saying what to raise (the video is fine), and not scored again into that --out; the 1.5 s video's 3 are scored.
    The limits are the --out's job: the defaults score both, in another --out."""
    cfg, uri, _ = infer_model
    folder = tmp_path / "videos"
    folder.mkdir()
    short = Path(shutil.copy(videos_of(synth_set / "val")[0], folder / "short.mp4"))
    long = synth.encode_video(
        folder / "long.mp4", synth.render(synth.sample_video(3, 0, 0, width=128, height=96, seconds=4.0))
    )
    config = tmp_path / "infer.yaml"
    config.write_text(cfg.to_yaml())
    args = [
        "infer",
        "--config",
        str(config),
        "--model-uri",
        uri,
        "--videos",
        str(folder),
        "--windows",
        "--stride-s",
        "0.5",
    ]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--max-windows", "3"]) == 0
    with open(out / "quarantine.csv") as f:
        (header, refused) = list(csv.reader(f))
    assert refused[:2] == [str(long), "timeline_limit"]
    assert refused[2].startswith("stride_s 0.5 s over 4.00 s in windows of 0.533 s makes 8 windows > max_windows 3")
    assert refused[2].endswith("; raise --max-windows to allow it")
    assert list(read(out)["video"]) == [str(short)] and len(read(out, "windows")) == 3
    assert json.loads((out / "infer.json").read_text())["job"]["max_windows"] == 3
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--max-windows", "3"]) == 0
    assert "0 to score, 2 already scored" in capsys.readouterr().out

    assert main([*args, "--out", str(out)]) == 1
    assert "other job than this run" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "defaults")]) == 0
    assert sorted(read(tmp_path / "defaults")["video"]) == sorted([str(long), str(short)])
    assert len(read(tmp_path / "defaults", "windows")) == 3 + 8

    capsys.readouterr()
    assert (
        main(
            [
                "infer",
                "--config",
                str(config),
                "--model-uri",
                uri,
                "--videos",
                str(folder),
                "--out",
                str(tmp_path / "no-windows"),
                "--max-clips",
                "50",
            ]
        )
        == 1
    )
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipelines infer")]
    assert error == ["pipelines infer: --max-clips is for timeline windows: add --windows"]
