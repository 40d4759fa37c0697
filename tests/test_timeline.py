"""Long-video timelines: one H.264 file showing three synthetic classes back to back, 2 s each, is cut into
windows whose top class is the class shown there, merged into segments whose cuts fall within one stride of
the true ones; `predict --timeline` prints the segments and writes them as JSON and a PNG, and refuses bad
window flags before any work; the registered model's pyfunc gives the same timeline with params timeline=true.
"""

from __future__ import annotations

import json
from dataclasses import replace

import matplotlib
import matplotlib.image
import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipelines import tracking
from pipelines.cli import EXIT_CONFIG, EXIT_OK, main
from slowfast.model import build
from slowfast.serving import ClipSpec, VideoClassifier, describe, segments
from slowfast.video import synth

from conftest import pipeline_config

CLASSES = ("scrolling up", "standing still", "flickering erratically")
PART_S = 2.0  # each class's stretch of the video: [0, 2), [2, 4), [4, 6) s
# slowfast_tiny's clip (32 frames at 30 fps, 1.07 s: the default window), no resize, one centre crop.
SPEC = ClipSpec(T=4, tau=8, alpha=4, target_fps=30.0, short_side=32, crop=32, temporal_views=3, spatial_crops=1)
STRIDE_S = 0.25
MODEL = "timeline-test"


def fitted_classifier(clean_videos) -> VideoClassifier:
    """slowfast_tiny whose classifier was fitted on clips of the three clean videos (the frames the long video
    is made of), its backbone frozen at its initial weights. Training the whole network until it tells the
    classes apart takes minutes on 2 CPU cores; the frozen backbone's features of these three videos are
    linearly separable, which is all this test needs: a model that knows what each stretch of the long video
    shows, to check where the timeline puts it (the fixture checks it on the clean videos first)."""
    torch.manual_seed(0)
    net = build("slowfast_tiny", num_classes=len(CLASSES)).eval()
    fit_views = VideoClassifier(net, CLASSES, replace(SPEC, temporal_views=4))
    features = [torch.from_numpy(fit_views.score(*fit_views.views(path), features=True)[1]) for path in clean_videos]
    labels = torch.cat([torch.full((len(f),), k) for k, f in enumerate(features)])
    optimizer = torch.optim.Adam(net.head.parameters(), lr=0.1)
    net.head.train()
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(net.head(torch.cat(features)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return VideoClassifier(net.eval(), CLASSES, SPEC)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The three classes' clean videos, the same frames back to back in one file (encoded once), the fitted
    classifier, and that model registered as the registry step logs one."""
    tmp = tmp_path_factory.mktemp("timeline")
    parts = [
        synth.render(synth.sample_video(0, synth.class_names().index(label), 0, width=48, height=32, seconds=PART_S))
        for label in CLASSES
    ]
    clean = [synth.encode_video(tmp / f"clean-{k}.mp4", frames) for k, frames in enumerate(parts)]
    video = synth.encode_video(tmp / "three-classes.mp4", np.concatenate(parts))
    classifier = fitted_classifier(clean)
    for label, result in zip(CLASSES, classifier.predict(clean, top_k=1), strict=True):
        assert result["labels"] == [label] and result["scores"][0] > 0.9, result

    cfg = pipeline_config(
        tmp,
        tmp,
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "timeline", "model_name": MODEL},
    )
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg, log=lambda *_: None)).info.run_id
    version = tracking.log_model(cfg, run_id, net=classifier.model, class_names=CLASSES, spec=SPEC, metadata={})
    config_path = tmp / "pipeline.yaml"
    config_path.write_text(cfg.to_yaml())
    return {
        "tmp": tmp,
        "clean": clean,
        "video": video,
        "classifier": classifier,
        "cfg": cfg,
        "config_path": config_path,
        "uri": f"models:/{MODEL}/{version}",
    }


def test_cuts_fall_halfway_between_the_centres_of_windows_that_disagree():
    def window(start_s, label):
        return {"start_s": start_s, "end_s": start_s + 1.0, "labels": [label, "other"], "scores": [0.8, 0.1]}

    # Windows of 1 s every 0.25 s: a, a, b, b. Their clips are centred at 0.5, 0.75, 1.0, 1.25 s, so the change
    # happened between 0.75 and 1.0 s; cutting at the first b window's start (0.5 s) would be 0.375 s early.
    rows = [window(0.25 * k, label) for k, label in enumerate("aabb")]
    assert segments(rows) == [
        {"start_s": 0.0, "end_s": 0.875, "label": "a", "score": 0.8},
        {"start_s": 0.875, "end_s": 1.75, "label": "b", "score": 0.8},
    ]
    # Windows that tile the video cut where the next one starts.
    rows = [window(1.0 * k, label) for k, label in enumerate("abba")]
    assert [(s["start_s"], s["end_s"], s["label"]) for s in segments(rows)] == [
        (0.0, 1.0, "a"),
        (1.0, 3.0, "b"),
        (3.0, 4.0, "a"),
    ]
    assert segments([]) == []


# Windows wholly inside one class's 2 s: 4 per class every 0.25 s; 1 per class when they tile the video;
# and the last window, which ends with the video.
@pytest.mark.parametrize("stride_s, inside", [(STRIDE_S, 13), (None, 4)], ids=["overlapping", "tiling"])
def test_timeline_finds_each_class_where_the_video_shows_it(scene, stride_s, inside):
    timeline = scene["classifier"].timeline(scene["video"], stride_s=stride_s, top_k=3)
    stride = stride_s or SPEC.sampling.clip_seconds
    windows = timeline["windows"]
    *regular, last = windows
    assert [w["start_s"] for w in regular] == [round(k * stride, 3) for k in range(len(regular))]
    assert regular[-1]["end_s"] < last["end_s"] == 3 * PART_S  # the tail: a last window ending with the video
    checked = 0
    for k, label in enumerate(CLASSES):
        for w in windows:
            if w["start_s"] >= k * PART_S - 1e-6 and w["end_s"] <= (k + 1) * PART_S + 1e-6:
                assert w["labels"][0] == label, (w, k)
                checked += 1
    assert checked == inside

    cuts = timeline["segments"]
    assert [s["label"] for s in cuts] == list(CLASSES)
    assert cuts[0]["start_s"] == 0.0 and cuts[-1]["end_s"] == windows[-1]["end_s"]
    for k in (1, 2):
        assert cuts[k - 1]["end_s"] == cuts[k]["start_s"]
        assert abs(cuts[k]["start_s"] - k * PART_S) <= stride, cuts
    assert all(0.5 < s["score"] <= 1.0 for s in cuts)


def test_predict_cli_prints_segments_and_writes_json_and_png(scene, capsys):
    out = scene["tmp"] / "cli"
    video, clean = str(scene["video"]), str(scene["clean"][1])
    code = main(
        [
            "predict",
            video,
            clean,
            "--config",
            str(scene["config_path"]),
            "--model-uri",
            scene["uri"],
            "--timeline",
            "--stride-s",
            "0.5",
            "--top-k",
            "2",
            "--json",
            str(out / "timeline.json"),
            "--plot",
            str(out / "timeline.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    # 6 s in windows of 1.07 s every 0.5 s: starts 0, 0.5, ..., 4.5 and 4.93 (ending with the video); the clean
    # 2 s video: 0, 0.5 and 0.93.
    assert f"{video}  (11 windows of 1.07 s, every 0.50 s)\n" in printed
    assert f"{clean}  (3 windows of 1.07 s, every 0.50 s)\n" in printed
    lines = [line.split() for line in printed.splitlines() if line.startswith("  ")]
    assert [" ".join(parts[4:-1]) for parts in lines] == [*CLASSES, CLASSES[1]]
    assert lines[0][:4] == ["0.00", "-", lines[1][0], "s"]  # a segment ends where the next starts

    written = json.loads((out / "timeline.json").read_text())
    assert [t["video"] for t in written] == [video, clean]
    for timeline in written:
        assert set(timeline) == {"video", "windows", "segments"}
        assert all(
            set(w) == {"start_s", "end_s", "labels", "scores"} and len(w["labels"]) == len(w["scores"]) == 2
            for w in timeline["windows"]
        )
        assert all(set(s) == {"start_s", "end_s", "label", "score"} for s in timeline["segments"])
    assert [s["label"] for s in written[0]["segments"]] == list(CLASSES)
    assert len(written[0]["windows"]) == 11 and written[1]["segments"][0]["label"] == CLASSES[1]

    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1000, 400)  # 10 x (1 + 1.5 per video) inches at 100 dpi
    pixels = matplotlib.image.imread(out / "timeline.png")[..., :3]
    for k in range(len(CLASSES)):  # each class's bars, in its colour at half opacity over white
        colour = 0.5 * np.array(matplotlib.colormaps["tab10"](k)[:3]) + 0.5
        assert (np.abs(pixels - colour).max(-1) < 2 / 255).sum() > 5000, CLASSES[k]


def test_predict_cli_refuses_bad_timeline_flags_before_any_work(tmp_path, capsys):
    missing = ["predict", str(tmp_path / "missing.mp4"), "--model-uri", "models:/no-such-model/1"]
    for flags, message in (
        (["--timeline", "--stride-s", "-1"], "--stride-s must be a number of seconds > 0, got -1.0"),
        (["--timeline", "--window-s", "0"], "--window-s must be a number of seconds > 0, got 0.0"),
        (["--timeline", "--stride-s", "nan"], "--stride-s must be a number of seconds > 0"),
        (["--timeline", "--top-k", "0"], "--top-k must be 1 or more, got 0"),
        (["--stride-s", "1", "--plot", "t.png"], "--stride-s, --plot only with --timeline"),
    ):
        assert main([*missing, *flags]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert message in err and "no-such-model" not in err and "missing.mp4" not in err, err
    assert not (tmp_path / "t.png").exists()


def test_predict_cli_json_without_timeline_writes_the_top_k_list(scene, capsys):
    path = scene["tmp"] / "top.json"
    assert (
        main(
            [
                "predict",
                str(scene["clean"][2]),
                "--config",
                str(scene["config_path"]),
                "--model-uri",
                scene["uri"],
                "--top-k",
                "2",
                "--json",
                str(path),
            ]
        )
        == EXIT_OK
    )
    assert f"wrote {path}" in capsys.readouterr().out
    (written,) = json.loads(path.read_text())
    assert written["video"] == str(scene["clean"][2]) and written["labels"][0] == CLASSES[2]
    assert len(written["scores"]) == 2 and written["scores"][0] > 0.9


def test_pyfunc_timeline_mode_returns_windows_and_segments(scene):
    with tracking.use_tracking(scene["cfg"]):
        model = mlflow.pyfunc.load_model(scene["uri"])
    data = scene["video"].read_bytes()
    out = model.predict([data], params={"timeline": True, "stride_s": 0.5})
    assert list(out.columns) == ["video", "windows", "segments"] and len(out) == 1
    expected = scene["classifier"].timeline(data, describe(data, 0), stride_s=0.5)
    row = out.iloc[0]
    assert row["video"] == expected["video"]
    assert [(w["start_s"], w["end_s"], w["labels"]) for w in row["windows"]] == [
        (w["start_s"], w["end_s"], w["labels"]) for w in expected["windows"]
    ]
    np.testing.assert_allclose(
        [w["scores"] for w in row["windows"]], [w["scores"] for w in expected["windows"]], atol=1e-5
    )
    assert [s["label"] for s in row["segments"]] == list(CLASSES)

    # Without timeline the output is the top-k table it always was.
    top = model.predict([data], params={"top_k": 2})
    assert list(top.columns) == ["video", "labels", "scores"] and len(top["labels"][0]) == 2
    with pytest.raises(MlflowException, match=r"params window_s must be a number of seconds > 0 .*got -1\.0"):
        model.predict([data], params={"timeline": True, "window_s": -1.0})
    with pytest.raises(MlflowException, match="params top_k must be 1 or more, got 0"):
        model.predict([data], params={"timeline": True, "top_k": 0})
    with pytest.raises(MlflowException, match="params window_s and stride_s are for timelines: add timeline=true"):
        model.predict([data], params={"stride_s": 0.5})
