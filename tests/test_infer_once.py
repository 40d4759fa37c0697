"""`infer` exactly once as a reader sees it: `read_predictions` holds one row per video, its latest score, after a
video changed, at a kill -9 between a part's write and its commit, and after the re-run; one run at a time per
--out (a second is refused naming the first; a dead one's lock is taken over); a video the storage did not deliver
is never committed, the run fails, and the same command scores it once the storage is back."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_infer import videos_of

from pipelines import tracking
from pipelines.cli import main
from pipelines.infer import list_videos, local_inputs, run_infer
from pipelines.infer_out import InferError, Job, RunLock, read_predictions, read_windows
from pipelines.storage import S3Options, Storage

from conftest import REPO, free_port
from faults import FaultProxy
from stop_hook import stop_after, wait_stopped

QUIET = dict(log=lambda *_: None)


def copies(videos: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    targets = [folder / f"{i:02d}-{v.name}" for i, v in enumerate(videos)]
    for v, target in zip(videos, targets, strict=True):
        shutil.copy(v, target)
    return targets


def scores(table) -> dict[str, tuple[list[str], list[float]]]:
    """video -> (labels, scores) of a predictions table, asserting one row per video."""
    rows = table.to_pylist()
    assert len({r["video"] for r in rows}) == len(rows), sorted(r["video"] for r in rows)
    return {r["video"]: (r["labels"], r["scores"]) for r in rows}


def same(got: tuple[list[str], list[float]], want: dict) -> bool:
    return got[0] == want["labels"] and np.allclose(got[1], want["scores"], atol=1e-5)


def test_a_video_scored_again_is_read_once_with_its_new_score(ray_local, infer_model, synth_set, tmp_path):
    """A video whose file changed is scored again, one whose file became garbage is quarantined: the reader, and
    after the run also a plain read of predictions/ (its superseded rows compacted away), hold one row per video."""
    cfg, uri, _ = infer_model
    videos = videos_of(synth_set)
    kept, changed, broken = copies(videos[:3], tmp_path / "videos")
    out, job = tmp_path / "out", Job(top_k=2, windows=True, stride_s=0.5)
    run_infer(cfg, uri, str(tmp_path / "videos"), str(out), job, **QUIET)
    before = scores(read_predictions(str(out)))

    shutil.copy(videos[5], changed)
    broken.write_bytes(b"no longer a video")
    # A reader polls all along the second run: its commits, and its compaction of the first run's parts.
    seen, failed, running = [], [], threading.Event()
    running.set()

    def poll():
        while running.is_set():
            try:
                seen.append(read_predictions(str(out)).column("video").to_pylist())
            except Exception as exc:  # noqa: BLE001 - reported by the test's thread below
                failed.append(exc)
                return

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        again = run_infer(cfg, uri, str(tmp_path / "videos"), str(out), job, **QUIET)
    finally:
        running.clear()
        reader.join()
    assert not failed, failed
    assert len(seen) > 1 and all(
        len(set(s)) == len(s) and {str(kept), str(changed)} <= set(s) <= set(before) for s in seen
    ), seen
    assert (again["scored_now"], again["quarantined_now"]) == (1, 1) and again["parts_compacted"] >= 1

    classifier = tracking.load_registered(cfg, uri)
    now = scores(read_predictions(str(out)))
    assert sorted(now) == sorted([str(changed), str(kept)])
    assert same(now[str(changed)], classifier.predict([videos[5]], top_k=2)[0])
    assert now[str(kept)] == before[str(kept)]
    windows = read_windows(str(out)).to_pandas()
    timeline = classifier.timeline(videos[5], window_s=None, stride_s=0.5, top_k=2)
    mine = windows[windows["video"] == str(changed)]
    assert list(mine["start_s"]) == [w["start_s"] for w in timeline["windows"]]
    assert set(windows["video"]) == {str(changed), str(kept)}
    assert f"{broken},not_a_video," in (out / "quarantine.csv").read_text()
    # Once the run has ended, the folder read as plain Parquet agrees.
    assert sorted(pq.read_table(out / "predictions").column("video").to_pylist()) == sorted(now)
    assert len(pq.read_table(out / "windows")) == len(windows)


def test_a_kill_between_a_part_and_its_commit_a_second_run_meanwhile_and_the_rerun(
    ray_local, infer_model, synth_set, tmp_path, capsys
):
    """Two videos changed; `pipelines infer` scores them again, one per part, and is killed (kill -9, its process
    group) right after writing its second part, before committing it. At that moment the reader holds each video
    once (one changed video with its new score, the other with its old one); a second run meanwhile is refused
    with one line naming the first; the same command then takes the dead run's lock over and ends with one row
    per video, in the reader and in the folder."""
    cfg, uri, _ = infer_model
    videos = videos_of(synth_set)
    folder = tmp_path / "videos"
    targets = copies(videos[:6], folder)
    out = tmp_path / "out"
    run_infer(cfg, uri, str(folder), str(out), Job(top_k=2), **QUIET)
    before = scores(read_predictions(str(out)))
    changed = {str(targets[0]): videos[6], str(targets[1]): videos[7]}
    for target, source in changed.items():
        shutil.copy(source, target)

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
        "--out",
        str(out),
        "--top-k",
        "2",
        "--set",
        "infer.batch_videos=1",
        "--set",
        "infer.workers=1",
    ]
    env = stop_after(tmp_path, "pyarrow.parquet:write_table", 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_stopped(proc, 240, "its second part")
        at_kill = scores(read_predictions(str(out)))
        assert sorted(at_kill) == sorted(before)
        rescored = [v for v in changed if at_kill[v] != before[v]]
        assert len(rescored) == 1, "one changed video committed, the other's part written but not committed"
        classifier = tracking.load_registered(cfg, uri)
        assert same(at_kill[rescored[0]], classifier.predict([changed[rescored[0]]], top_k=2)[0])
        # Read as a plain Parquet folder, predictions/ has the superseded row and the uncommitted part too.
        assert len(pq.read_table(out / "predictions")) == len(before) + 2

        capsys.readouterr()
        assert main(args) == 1
        refused = capsys.readouterr().err.strip().splitlines()
        assert len(refused) == 1 and "another infer run is writing there (run " in refused[0]
        assert f"host {socket.gethostname()}, pid {proc.pid}," in refused[0]
        assert scores(read_predictions(str(out))) == at_kill
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    assert main(args) == 0
    said = capsys.readouterr().out
    assert "infer: took over the lock of run " in said and f"pid {proc.pid}," in said
    assert "1 to score, 5 already scored" in said and "(1 uncommitted files of an interrupted run removed)" in said
    after = scores(read_predictions(str(out)))
    assert sorted(after) == sorted(before)
    for video, source in changed.items():
        assert same(after[video], classifier.predict([source], top_k=2)[0])
    assert {v: after[v] for v in after if v not in changed} == {v: before[v] for v in before if v not in changed}
    assert sorted(pq.read_table(out / "predictions").column("video").to_pylist()) == sorted(after)
    locks = list((out / "lock").glob("*.json"))
    assert len(locks) == 1 and json.loads(locks[0].read_text())["released"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_runs_racing_for_an_out_one_takes_the_lock(where, s3_endpoint, tmp_path):
    """Eight runs take the lock of one --out at once (O_EXCL locally, a conditional PUT on S3): exactly one holds it,
    the others are refused naming it; released, the next run takes it."""
    if where == "s3":
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="locks")
    out = Storage(str(tmp_path / "out") if where == "local" else "s3://locks/out", S3Options(s3_endpoint))
    locks = [RunLock(out, f"run-{i}") for i in range(8)]
    start, outcomes = threading.Barrier(len(locks)), {}

    def take(lock: RunLock) -> None:
        start.wait()
        try:
            lock.acquire()
            outcomes[lock.run_id] = "held"
        except InferError as exc:
            outcomes[lock.run_id] = str(exc)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [run for run, said in outcomes.items() if said == "held"]
    assert len(held) == 1 and len(outcomes) == len(locks)
    assert all(
        f"another infer run is writing there (run {held[0]}, host " in said
        for run, said in outcomes.items()
        if run != held[0]
    )
    next(lock for lock in locks if lock.run_id == held[0]).release()
    late = RunLock(out, "late")
    assert late.acquire() is None  # a released lock: nothing taken over
    late.release()


def test_a_store_without_conditional_writes_is_refused_and_a_live_lock_in_another_process_space_is_kept(
    s3_endpoint, tmp_path
):
    """An S3 endpoint that ignores If-None-Match (here: a proxy that drops the header) could let two runs hold the
    lock: refused. A lock whose pid is not alive here, written with this host's name from another boot or pid
    namespace (a container on the host's network), is a live run's while its heartbeat is fresh."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="unconditional")
    with FaultProxy(s3_endpoint, drop_headers=("If-None-Match",)) as proxy:
        with pytest.raises(InferError, match="does not honour conditional writes"):
            RunLock(Storage("s3://unconditional/out", S3Options(proxy.url)), "run").acquire()

    out = Storage(str(tmp_path / "out"))
    first = RunLock(out, "first")
    first.acquire()
    first._stop.set()  # no heartbeat from here on: the lock stays as the test writes it
    path = Path(out.path(RunLock._name(first.number)))
    lock = json.loads(path.read_text())
    lock["pid"] = 2**22 + 7  # above Linux's pid_max: no process here has it
    path.write_text(json.dumps({**lock, "processes": "another-boot pid:[4026531836]"}))
    with pytest.raises(InferError, match="another infer run is writing there"):
        RunLock(out, "second").acquire()
    path.write_text(json.dumps(lock))  # the same process space: its pid is gone, the run is dead
    second = RunLock(out, "second")
    assert second.acquire()["run_id"] == "first"
    second.release()


class Endpoint:
    """A port on 127.0.0.1 that forwards to the S3 endpoint once `up()`; before, nothing listens there (an
    endpoint that is down: connections refused)."""

    def __init__(self, upstream: str):
        self.port, self.upstream = free_port(), urlparse(upstream)
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: socket.socket | None = None

    def up(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        if self.server:
            self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection((self.upstream.hostname, self.upstream.port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def with_s3(cfg, endpoint: str):
    """Two tries per S3 call: botocore's retries run, and the test does not wait long on a storage that is down."""
    return cfg.model_copy(update={"s3": cfg.s3.model_copy(update={"endpoint_url": endpoint, "max_attempts": 2})})


def test_a_listed_s3_video_on_an_endpoint_that_is_down_is_not_committed_and_scored_once_it_is_up(
    ray_local, infer_model, synth_set, s3_endpoint, tmp_path, capsys
):
    cfg, uri, _ = infer_model
    videos = videos_of(synth_set)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="unread-head")
    boto3.client("s3", endpoint_url=s3_endpoint).upload_file(str(videos[1]), "unread-head", "in/v.mp4")
    endpoint = Endpoint(s3_endpoint)
    config = tmp_path / "infer.yaml"
    config.write_text(with_s3(cfg, endpoint.url).to_yaml())
    listing = tmp_path / "list.txt"
    listing.write_text(f"{videos[0]}\ns3://unread-head/in/v.mp4\n")
    out = tmp_path / "out"
    args = ["infer", "--config", str(config), "--model-uri", uri, "--videos", str(listing), "--out", str(out)]

    capsys.readouterr()
    assert main(args) == 1
    # Ray Data's progress lines (this process's Ray logs at INFO) aside, one line says what happened.
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipelines infer")]
    assert len(error) == 1 and error[0].startswith(
        "pipelines infer: 1 video not read (read_failed 1; e.g. s3://unread-head/in/v.mp4: read_failed: HEAD: "
    )
    assert "run the same command again to score them" in error[0]
    committed = [v["video_id"] for c in (out / "manifests").glob("*.json") for v in json.loads(c.read_text())["videos"]]
    assert committed == [str(videos[0])]  # the local video: scored and committed, the other one not at all
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["scored_now"], summary["unread_now"], summary["unread_reasons"]) == (1, 1, {"read_failed": 1})

    endpoint.up()
    try:
        assert main(args) == 0
    finally:
        endpoint.close()
    said = capsys.readouterr().out
    assert "1 to score, 1 already scored" in said and "summary: 1 videos scored now" in said
    now = scores(read_predictions(str(out)))
    assert sorted(now) == sorted([str(videos[0]), "s3://unread-head/in/v.mp4"])
    assert same(now["s3://unread-head/in/v.mp4"], tracking.load_registered(cfg, uri).predict([videos[1]], top_k=5)[0])


def test_videos_whose_reads_fail_are_not_committed_and_the_same_command_scores_them(
    ray_local, infer_model, synth_set, s3_endpoint, tmp_path, capsys
):
    """The listing works, every video GET is reset (after botocore's retries: `ReadFailed` in the decode task):
    no video committed, InferError (or, within infer.max_unread, a summary line saying so); with the network back
    the same call scores them all."""
    cfg, uri, _ = infer_model
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="unread-get")
    for v in videos_of(synth_set)[:2]:
        client.upload_file(str(v), "unread-get", f"in/{v.name}")
    out = tmp_path / "out"
    with FaultProxy(s3_endpoint) as proxy:
        proxy.down = True
        cfg = with_s3(cfg, proxy.url)
        with pytest.raises(
            InferError,
            match=r"^2 videos not read \(read_failed 2; e.g. s3://unread-get/in/.*: "
            r"read_failed: .*\): nothing was committed for them",
        ):
            run_infer(cfg, uri, "s3://unread-get/in", str(out), Job(top_k=1), **QUIET)
        assert proxy.injected["reset"] >= 2
        assert len(read_predictions(str(out))) == 0 and not list((out / "manifests").glob("*.json"))
        config = tmp_path / "infer.yaml"
        config.write_text(cfg.to_yaml())
        capsys.readouterr()
        assert (
            main(
                [
                    "infer",
                    "--config",
                    str(config),
                    "--set",
                    "infer.max_unread=2",
                    "--model-uri",
                    uri,
                    "--videos",
                    "s3://unread-get/in",
                    "--out",
                    str(out),
                    "--top-k",
                    "1",
                ]
            )
            == 0
        )
        said = capsys.readouterr().out
        assert (
            "summary: 0 videos scored now (0 views, 0.0 videos/s), 0 unreadable, 2 not read (read_failed 2: "
            "the next run scores them); 0 scored in all" in said
        )
        assert not list((out / "manifests").glob("*.json"))
        proxy.down = False
        s = run_infer(cfg, uri, "s3://unread-get/in", str(out), Job(top_k=1), **QUIET)
    assert (s["scored_now"], s["unread_now"], s["scored_total"]) == (2, 0, 2)
    assert len(read_predictions(str(out))) == 2


def test_a_list_files_local_videos_must_be_shared_on_a_cluster(synth_set, tmp_path):
    """What init_ray's multi-node check is given: a folder, or the local files a list file names (an s3:// entry
    is read from anywhere), missing ones included (on another node they may be there)."""
    video = videos_of(synth_set)[0]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{video}\n{tmp_path / 'gone.mp4'}\n")
    tasks, bad = list_videos(str(listing), S3Options())
    assert local_inputs(str(listing), tasks, bad) == {f"--videos {listing} names 2 local files, e.g.": str(video)}
    assert local_inputs(str(synth_set), [], []) == {"--videos": str(synth_set)}
    assert local_inputs("s3://bucket/videos", [], []) == {}


@pytest.mark.heavy
def test_a_list_file_naming_local_videos_is_refused_on_a_head_that_runs_no_work(infer_model, synth_set, tmp_path):
    """A real Ray head with 0 CPUs (every task would run on some other node): `pipelines infer` with a list file of
    local paths stops before anything is committed, saying what to do."""
    cfg, uri, _ = infer_model
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    # Free ports for everything the head opens: the test session's own Ray holds Ray's defaults.
    ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            "--include-dashboard=false",
            *ports,
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        listing = tmp_path / "list.txt"
        listing.write_text(f"{videos_of(synth_set)[0]}\n")
        config = tmp_path / "infer.yaml"
        config.write_text(cfg.to_yaml())
        out = tmp_path / "out"
        deadline = time.time() + 120
        while True:  # the head's GCS answers some seconds after start
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipelines",
                    "infer",
                    "--config",
                    str(config),
                    "--set",
                    f"ray.address=127.0.0.1:{port}",
                    "--model-uri",
                    uri,
                    "--videos",
                    str(listing),
                    "--out",
                    str(out),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if "a local path" in done.stderr or time.time() > deadline:
                break
            time.sleep(2)
    finally:
        # Its whole process group, at once: a SIGTERM'd head takes half a minute to stop, for nothing kept.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        f"--videos {listing} names 1 local file, e.g. '{videos_of(synth_set)[0]}': a local path, and this Ray "
        "cluster has a head node that runs no tasks (0 CPUs)"
    ) in done.stderr
    assert "--set shared_filesystem=true" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "manifests").exists() or not list((out / "manifests").iterdir())
