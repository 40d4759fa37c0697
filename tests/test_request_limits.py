"""Bounded requests: a timeline's windows and clips are capped from the video's duration before anything is decoded
(a million windows is refused within seconds, by `VideoClassifier.timeline` and by the logged model's pyfunc, with the
limit, the value asked and the key that raises it); a window longer than the video is clamped to it and says so; the
pyfunc refuses videos over its byte and duration limits; scoring goes chunk by chunk with the figures of scoring every
view at once, and the peak memory of `predict --timeline` on a 2-minute video hardly moves from 20 to 400 windows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import weakref

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipelines import tracking
from slowfast.model import build
from slowfast.serving import ClipSpec, VideoClassifier, window_means
from slowfast.video import synth
from slowfast.video.clips import MAX_CLIPS, MAX_WINDOWS, TimelineLimitError, TimelineLimits, iter_clips

from conftest import REPO, pipeline_config

MODEL = "limits-test"
CLASSES = ("a", "b", "c")
# slowfast_tiny's clip: 16 Fast frames over 32 at 30 fps (1.07 s); one centre crop, small.
SPEC = ClipSpec(T=4, tau=8, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=2, spatial_crops=1)
GUARD_S = 20  # a refusal answers in well under a second; planning a million windows took minutes and 23 GB


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2 s video and a fresh slowfast_tiny, as a VideoClassifier and logged and registered as the registry step
    logs one (no training: these tests check what is refused and how much is scored, not what is recognised)."""
    tmp = tmp_path_factory.mktemp("limits")
    video = synth.encode_video(
        tmp / "two-seconds.mp4", synth.render(synth.sample_video(0, 1, 0, width=64, height=48, seconds=2.0))
    )
    cfg = pipeline_config(
        tmp, tmp, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "limits", "model_name": MODEL}
    )
    torch.manual_seed(0)
    net = build("slowfast_tiny", num_classes=len(CLASSES)).eval()
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg, log=lambda *_: None)).info.run_id
    version = tracking.log_model(cfg, run_id, net=net, class_names=CLASSES, spec=SPEC, metadata={})
    return {
        "tmp": tmp,
        "video": video,
        "cfg": cfg,
        "uri": f"models:/{MODEL}/{version}",
        "classifier": VideoClassifier(net, CLASSES, SPEC),
    }


@pytest.fixture(scope="module")
def nine_seconds(tmp_path_factory):
    """Three synthetic classes back to back, 3 s each: a real H.264 file long enough for many chunks."""
    parts = [synth.render(synth.sample_video(2, k, 0, width=64, height=48, seconds=3.0)) for k in range(3)]
    return synth.encode_video(tmp_path_factory.mktemp("nine") / "nine-seconds.mp4", np.concatenate(parts))


def load(logged, **model_config):
    with tracking.use_tracking(logged["cfg"]):
        return mlflow.pyfunc.load_model(logged["uri"], model_config=model_config or None)


def test_the_window_count_is_refused_from_the_duration_with_the_shortest_stride_that_fits():
    sampling = SPEC.sampling
    frames = 300  # 10 s at 30 fps
    started = time.perf_counter()
    with pytest.raises(TimelineLimitError) as refused:
        sampling.windows(frames, stride_s=0.001)  # the 7,868 windows (of its model's clip) and more
    assert time.perf_counter() - started < 1.0
    err = refused.value
    assert (err.key, err.asked, err.limit) == ("max_windows", 8935, MAX_WINDOWS)  # (10 - 1.0667) / 0.001 + 1, + tail
    assert "makes 8,935 windows > max_windows 1,000" in str(err)
    shortest = float(re.search(r"a stride_s of ([0-9.e-]+) s or more fits", str(err)).group(1))
    assert shortest == pytest.approx((10 - 32 / 30) / 998, rel=1e-3)
    assert len(sampling.windows(frames, stride_s=shortest)) <= MAX_WINDOWS
    with pytest.raises(TimelineLimitError, match="max_windows"):
        sampling.windows(frames, stride_s=shortest * 0.98)
    # A stride so small that the count overflows a float is refused all the same.
    with pytest.raises(TimelineLimitError, match="makes inf windows > max_windows 1,000"):
        sampling.windows(frames, stride_s=1e-320)
    # Clips: 11 windows of 1 clip each; 2 s windows hold 2 clips each.
    assert len(sampling.windows(frames, window_s=1.0, stride_s=0.9, limits=TimelineLimits(max_clips=11))) == 11
    with pytest.raises(TimelineLimitError) as refused:
        sampling.windows(frames, window_s=2.0, stride_s=1.0, limits=TimelineLimits(max_clips=10))
    assert (refused.value.key, refused.value.asked) == ("max_clips", 18)  # 9 windows x 2 clips
    assert "9 windows of 2 s, 2 clips of 1.07 s each, make 18 clips > max_clips 10" in str(refused.value)
    assert MAX_CLIPS >= MAX_WINDOWS  # the default window (one clip) is bounded by the window count first
    with pytest.raises(ValueError, match="TimelineLimits: max_windows must be a whole number >= 1, got 0"):
        TimelineLimits(max_windows=0)


def test_a_million_windows_is_refused_within_seconds_by_the_classifier(logged):
    started = time.perf_counter()
    with pytest.raises(TimelineLimitError) as refused:
        logged["classifier"].timeline(logged["video"], stride_s=1e-6)
    elapsed = time.perf_counter() - started
    assert elapsed < GUARD_S, elapsed
    # Windows of one clip (1.07 s) every microsecond over 2 s: (2 - 1.0667) / 1e-6 + 1.
    assert (refused.value.key, refused.value.asked, refused.value.limit) == ("max_windows", 933_334, 1000)
    assert "stride_s 1e-06 s over 2.00 s" in str(refused.value) and "TimelineLimits.max_windows" in str(refused.value)


def test_a_million_windows_is_refused_within_seconds_by_the_pyfunc_naming_the_model_config_key(logged):
    model = load(logged)
    data = logged["video"].read_bytes()
    started = time.perf_counter()
    with pytest.raises(MlflowException) as refused:
        model.predict([data], params={"timeline": True, "stride_s": 1e-6})
    elapsed = time.perf_counter() - started
    assert elapsed < GUARD_S, elapsed
    message = refused.value.message
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400 over REST
    assert message.startswith(f"video 0 (<video 0: {len(data)} bytes>): stride_s 1e-06 s over 2.00 s")
    assert "makes 933,334 windows > max_windows 1,000; a stride_s of 0.000936 s or more fits" in message
    assert "model_config key 'max_windows'" in message and "MLFLOW_PYFUNC_INFERENCE_CONFIG" in message

    # The key is read at load time: a lower limit refuses 3 windows (0, 0.5 and 0.93 s) that the default accepts.
    assert len(model.predict([data], params={"timeline": True, "stride_s": 0.5})["windows"][0]) == 3
    with pytest.raises(MlflowException, match="makes 3 windows > max_windows 2"):
        load(logged, max_windows=2).predict([data], params={"timeline": True, "stride_s": 0.5})
    with pytest.raises(
        MlflowException, match=r"make 3 clips > max_clips 2: .*; the limit is the model_config key 'max_clips'"
    ):
        load(logged, max_clips=2).predict([data], params={"timeline": True, "stride_s": 0.5})
    with pytest.raises(ValueError, match="model_config max_windows must be a whole number >= 1, got -5"):
        load(logged, max_windows=-5)


def test_the_server_environment_sets_the_limits_as_the_message_says(logged, monkeypatch):
    """`mlflow models serve` loads the model with mlflow.pyfunc.load_model in its own process: the environment
    variable the 400 names reaches it there (MLflow applies it to the keys the saved model declares)."""
    data = logged["video"].read_bytes()
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"max_windows": 2}')
    with pytest.raises(MlflowException, match="makes 3 windows > max_windows 2"):
        load(logged).predict([data], params={"timeline": True, "stride_s": 0.5})
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"max_video_s": 1.5}')
    with pytest.raises(MlflowException, match="the video lasts 2.0 s > max_video_s 1.5 s"):
        load(logged).predict([data])


def test_a_window_longer_than_the_video_is_clamped_to_it_and_says_so(logged):
    classifier = logged["classifier"]
    (window,) = SPEC.sampling.windows(60, window_s=600.0)
    # Clamped to the 2 s video: its clips follow its length (2 of 1.07 s), not the 600 s asked (563 clips).
    assert (window.start_s, window.end_s, window.clamped_from_s, len(window.plans)) == (0.0, 2.0, 600.0, 2)
    timeline = classifier.timeline(logged["video"], window_s=600.0, top_k=2)
    assert [(w["start_s"], w["end_s"]) for w in timeline["windows"]] == [(0.0, 2.0)]
    assert timeline["clamped"] == "window_s 600 s is longer than the video (2.000 s): one window, the whole video"
    assert "clamped" not in classifier.timeline(logged["video"], window_s=1.0)

    row = (
        load(logged)
        .predict([logged["video"].read_bytes()], params={"timeline": True, "window_s": 600.0, "top_k": 2})
        .iloc[0]
    )
    assert row["clamped"] == timeline["clamped"]
    assert [w["scores"] for w in row["windows"]] == [w["scores"] for w in timeline["windows"]]


def test_the_pyfunc_refuses_videos_over_its_size_and_duration_before_decoding(logged):
    data = logged["video"].read_bytes()
    small = load(logged, max_video_bytes=1000)
    with pytest.raises(MlflowException) as refused:
        small.predict([data])
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert refused.value.message.startswith(
        f"video 0 (<video 0: {len(data)} bytes>): {len(data):,} bytes > "
        "max_video_bytes 1,000; the limit is the model_config key 'max_video_bytes'"
    )
    # Base64 is measured before it is decoded: 100 MB of it is refused at once under the default 64 MiB.
    started = time.perf_counter()
    with pytest.raises(MlflowException, match=r"75,000,000 bytes > max_video_bytes 67,108,864"):
        load(logged).predict(["QUJD" * 25_000_000])
    assert time.perf_counter() - started < GUARD_S

    with pytest.raises(
        MlflowException,
        match=r"video 0 \(.*\): the video lasts 2.0 s > max_video_s 1.5 s; the limit "
        r"is the model_config key 'max_video_s'",
    ):
        load(logged, max_video_s=1.5).predict([data])
    assert len(load(logged, max_video_s=2.5).predict([data])["labels"][0]) == 3

    # Frames decoded are counted whatever the header says (the 2 s video has 60), and videos per request.
    with pytest.raises(
        MlflowException,
        match=r"video 0 \(.*\): more than max_frames 20 frames to decode; the limit is "
        r"the model_config key 'max_frames'",
    ):
        load(logged, max_frames=20).predict([data])
    with pytest.raises(
        MlflowException,
        match=r"^3 videos in one request > max_videos 2: send them in several requests, "
        r"or raise the model_config key 'max_videos'",
    ):
        load(logged, max_videos=2).predict([data] * 3)
    assert len(load(logged, max_videos=2).predict([data] * 2)) == 2


def all_at_once(spec: ClipSpec, video, **timeline):
    """Every timeline window's views cut in one go, as before chunks: the views, the slow indices, the windows."""
    found = []

    def plans(num_frames: int):
        found.extend(spec.plan(num_frames, test_views=False, windows=True, **timeline).windows)
        return [p for w in found for p in w.plans]

    fast, slow_index = spec.cut_views(video, plans=plans)
    return fast, slow_index, found


def test_scoring_in_chunks_gives_the_figures_of_scoring_every_view_at_once(logged, nine_seconds):
    """The timeline as it was scored before chunks (every window's views cut, then one `score`, then the window
    means) against the chunked one, with batches that do not divide the windows' views."""
    video, net = nine_seconds, logged["classifier"].model
    for crops, batch_views in ((1, 5), (3, 4)):
        spec = ClipSpec(
            T=4, tau=8, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=3, spatial_crops=crops
        )
        classifier = VideoClassifier(net, CLASSES, spec, batch_views=batch_views)
        for window_s, stride_s in ((None, 0.3), (2.5, 0.7)):
            fast, slow_index, windows = all_at_once(spec, video, window_s=window_s, stride_s=stride_s)
            whole = window_means([classifier.score(fast, slow_index)[0]], [len(w.plans) * crops for w in windows])
            chunked = classifier.timeline(video, window_s=window_s, stride_s=stride_s, top_k=3)
            assert len(chunked["windows"]) == len(windows) > 2 * classifier.chunk_clips
            assert [(w["start_s"], w["end_s"]) for w in chunked["windows"]] == [
                (round(w.start_s, 3), round(w.end_s, 3)) for w in windows
            ]
            for row, probs in zip(chunked["windows"], whole, strict=True):
                expected = sorted(zip(probs, CLASSES, strict=True), key=lambda pair: -pair[0])
                assert row["labels"] == [label for _, label in expected]
                np.testing.assert_allclose(row["scores"], [p for p, _ in expected], atol=1e-6)
        with spec.open(video) as reader:
            plans = spec.plan(
                reader.info.frames_at(spec.target_fps), test_views=False, windows=True, stride_s=0.3
            ).plans
            chunks = list(spec.iter_views(reader, plans, 7))
        assert [len(c) for c in chunks[:-1]] == [7 * crops] * (len(chunks) - 1)
        assert np.array_equal(np.concatenate(chunks), all_at_once(spec, video, stride_s=0.3)[0])
        # predict: the test views, chunked, average as one score of them all.
        fast, slow_index = spec.cut_views(video)
        np.testing.assert_allclose(
            classifier.probabilities(video), classifier.score(fast, slow_index)[0].astype(np.float64).mean(0), atol=1e-6
        )


def test_iter_clips_holds_only_the_frames_of_the_chunk_in_hand(nine_seconds):
    """Chunks of a timeline in time order: what is alive at each chunk is about that chunk's frames, not the
    video's; every frame is still decoded (and encoded) once."""

    class Frame:
        def __init__(self, rgb):
            self.rgb = rgb

    alive: weakref.WeakSet = weakref.WeakSet()
    encoded = 0

    def encode(rgb):
        nonlocal encoded
        encoded += 1
        frame = Frame(rgb)
        alive.add(frame)
        return frame

    sampling = SPEC.sampling
    with SPEC.open(nine_seconds) as reader:
        plans = [p for w in sampling.windows(reader.info.frames_at(30.0), stride_s=0.1) for p in w.plans]
        groups = [plans[i : i + 4] for i in range(0, len(plans), 4)]
        held = []
        for clips in iter_clips(reader, sampling, groups, encode=encode):
            held.append(len(alive))
            del clips
    distinct = {int(j) for p in plans for j in p.indices}
    assert len(plans) == 81 and len(distinct) == 268  # 81 windows every 0.1 s: nearly every frame of the video
    # Each frame encoded once; alive at any chunk: its 4 clips' frames (4 windows 3 frames apart, 16 frames over 32
    # each), 40 of the 268.
    assert encoded == len(distinct) and max(held) <= 40, (encoded, held)


def rss_of(command: list[str], env: dict) -> tuple[int, str]:
    """Peak resident memory (bytes) of a child process, from the kernel's accounting (wait4), and its output."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, output
    return usage.ru_maxrss * 1024, output


@pytest.mark.heavy
def test_predict_timeline_peak_memory_does_not_grow_with_the_windows(tmp_path_factory):
    """`python -m pipelines predict --timeline` on a 2-minute video, 21 windows against 398: the views of 398
    windows take 300 MiB (16 frames of 128 x 128 x 3 each), which scoring them all at once held on top of the
    rest (with the decoded frames: +634 MiB measured before chunks); in chunks, the peak grows by far less.

    glibc's dynamic mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_): otherwise the chunks' freed buffers stay in
    its heap as slack that depends on the machine's thread count (+74 to +83 MiB at 398 windows, +66 MiB at 993:
    a plateau, not a growth), and the figure would measure the allocator rather than what the code holds."""
    tmp = tmp_path_factory.mktemp("memory")
    spec = ClipSpec(T=4, tau=8, alpha=4, target_fps=30.0, short_side=128, crop=128, temporal_views=1, spatial_crops=1)
    frames = (synth.render(synth.sample_video(4, k % 4, k, width=160, height=128, seconds=10.0)) for k in range(12))
    video = synth.encode_video(tmp / "two-minutes.mp4", frames)
    cfg = pipeline_config(
        tmp,
        tmp,
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "memory", "model_name": "memory-test"},
    )
    torch.manual_seed(0)
    net = build("slowfast_tiny", num_classes=len(CLASSES)).eval()
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg, log=lambda *_: None)).info.run_id
    version = tracking.log_model(cfg, run_id, net=net, class_names=CLASSES, spec=spec, metadata={})
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg),
        "PYTHONPATH": str(REPO),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    command = [
        sys.executable,
        "-m",
        "pipelines",
        "predict",
        str(video),
        "--model-uri",
        f"models:/memory-test/{version}",
        "--timeline",
    ]
    few, few_out = rss_of([*command, "--stride-s", "6"], env)
    many, many_out = rss_of([*command, "--stride-s", "0.3"], env)
    assert "(21 windows of 1.07 s, every 6.00 s)" in few_out and "(398 windows of 1.07 s, every 0.30 s)" in many_out
    views = 398 * 16 * 128 * 128 * 3
    print(
        f"peak RSS: 21 windows {few / 2**20:.0f} MiB, 398 windows {many / 2**20:.0f} MiB; "
        f"the 398 windows' views: {views / 2**20:.0f} MiB"
    )
    assert many - few < views / 6, (few, many)  # measured: +0 to +14 MiB


def test_predict_refuses_a_million_windows_in_one_line_naming_its_flag(logged, capsys):
    from pipelines import cli

    config = logged["tmp"] / "limits.yaml"
    config.write_text(logged["cfg"].model_dump_json())  # JSON is YAML; its tracking URI holds the model
    video = str(logged["video"])
    started = time.perf_counter()
    code = cli.main(
        ["predict", video, "--config", str(config), "--model-uri", logged["uri"], "--timeline", "--stride-s", "1e-6"]
    )
    assert time.perf_counter() - started < GUARD_S
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_FAILED and len(err) == 1, err
    assert err[0].startswith(
        f"pipelines predict: {video}: stride_s 1e-06 s over 2.00 s in windows of 1.07 s makes "
        "933,334 windows > max_windows 1,000"
    )
    assert err[0].endswith("raise --max-windows to allow it"), err[0]
    # The flag raises it: 3 windows (0, 0.5, 0.93 s) pass with --max-windows 3 and not with 2.
    args = ["predict", video, "--config", str(config), "--model-uri", logged["uri"], "--timeline", "--stride-s", "0.5"]
    assert cli.main([*args, "--max-windows", "2"]) == cli.EXIT_FAILED
    assert "max_windows 2" in capsys.readouterr().err
    assert cli.main([*args, "--max-windows", "3"]) == cli.EXIT_OK
    assert "(3 windows of 1.07 s, every 0.50 s)" in capsys.readouterr().out
