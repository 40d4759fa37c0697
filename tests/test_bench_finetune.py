"""The fine-tuning benchmark end to end on a tiny synthetic set: real synth and preprocess (local Ray), a real
pre-training, real exports in the four foreign formats, real fine-tunes and scratch runs in two spawned workers;
every format's fine-tune starts from the same weights, and a re-run trains nothing."""

from __future__ import annotations

import json

import pytest
import torch

from slowfast.model import SlowFast, SlowFastConfig, load_checkpoint

from conftest import load_benchmark

FORMATS = ["caffe2", "pyslowfast", "pytorchvideo", "mmaction2"]


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_finetune.py, loaded by path and registered as `python -m pipelines bench finetune` loads
    it (the spawned training workers find its functions by module name)."""
    return load_benchmark("finetune", monkeypatch)


def test_quick_study_fine_tunes_every_format_from_the_same_weights(bench, ray_local, tmp_path, capsys):
    out = tmp_path / "ft"
    # --quick's set, at the fewest steps that still give a two-point curve (--quick alone: 4 steps, eval every 2).
    steps = ["--steps", "2", "--eval-every", "1", "--pretrain-steps", "1"]
    argv = ["--quick", *steps, "--out", str(out), "--workers", "2", "--threads", "1"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())

    # Two disjoint halves of the synthetic classes, each a folder-format dataset.
    pre, ft = summary["classes"]["pretrain"], summary["classes"]["finetune"]
    assert len(pre) == 3 and len(ft) == 2 and not set(pre) & set(ft)
    assert sorted(p.name for p in (out / "videos" / "finetune" / "train").iterdir()) == ft

    # The table: scratch (the baseline) and a fine-tune per format, each with its figure and ratio.
    table = (out / "finetune.md").read_text()
    header = table.splitlines()[2]
    for column in (
        "arm",
        "top-1 at 2 steps (mean ± std)",
        "/ scratch (same seeds)",
        "steps to top-1 ≥ 0.7, per seed",
        "scratch steps / these",
    ):
        assert column in header
    arms = ["scratch"] + [f"finetune-{f}" for f in FORMATS]
    assert [r["arm"] for r in summary["arms"]] == arms
    for arm in arms:
        assert f"| {arm} " in table
    assert table.strip() in printed
    assert (out / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in summary["arms"]:
        assert row["seeds"] == [0] and 0 <= row["top1_mean"] <= 1 and row["top1_std"] == 0.0
        assert [step for step, _ in row["curve"]] == [1, 2] and row["curve"][-1][1] == row["top1"][0]

    # Each export loads back equal to the pre-trained network (checked here again, independently).
    checks = {c["format"]: c for c in summary["formats"]}
    assert list(checks) == FORMATS
    pretrained = next((out / "pretrain").glob("*/pretrained.pt"))
    want = torch.load(pretrained, weights_only=True)["model_state"]
    model_cfg = SlowFastConfig(**torch.load(pretrained, weights_only=True)["config"])
    for fmt, check in checks.items():
        assert check["equal"] and check["detected"] == fmt and check["tensors"] > 150
        net = SlowFast(model_cfg)
        load_checkpoint(net, check["path"])
        got = net.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items() if not k.endswith("num_batches_tracked"))

    # Every format's fine-tune started from identical weights: the pre-trained backbone, the head re-initialised
    # from the seed; loaded here again from the files, and as the runs recorded them.
    runs = {r["format"]: r for r in summary["runs"] if r["format"]}
    assert sorted(runs) == sorted(FORMATS)
    starts = {}
    for fmt in FORMATS:
        torch.manual_seed(0)
        net = SlowFast(model_cfg.model_copy(update={"num_classes": len(ft)}))
        report = load_checkpoint(net, checks[fmt]["path"], head="auto", class_names=ft)
        assert report.reinitialised == ("head.fc.weight", "head.fc.bias")
        starts[fmt] = bench.state_digest(net.state_dict())
        assert runs[fmt]["init_digest"] == starts[fmt]
        assert runs[fmt]["init_tags"]["init_format"] == fmt
        assert runs[fmt]["init_backbone_digest"] == bench.backbone_digest(want)
    assert len(set(starts.values())) == 1
    findings = {f["finding"]: f for f in summary["findings"]}
    assert (
        findings[
            "every format hands over the same weights (loads back equal; same start per seed; "
            "backbone = the pre-trained one)"
        ]["passed"]
        is True
    )
    assert (
        findings["fine-tunes from the different formats train identically (same losses, curve, top-1)"]["passed"]
        is True
    )
    assert len({(r["losses_digest"], r["top1"]) for r in runs.values()}) == 1
    scratch = next(r for r in summary["runs"] if r["arm"] == "scratch")
    assert scratch["losses_digest"] != runs["caffe2"]["losses_digest"]  # other weights, another training

    # Re-run: every result is on disk, nothing is trained again.
    results = sorted((out / "results").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    assert bench.main([*argv, "--workers", "1"]) == 0
    assert "0 trainings now, 6 done before" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted((out / "results").glob("*.json"))] == stamps


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--formats", "caffe2,onnx"], "--formats: unknown onnx"),
        (["--classes", "6", "--pretrain-classes", "3"], "must differ in class count"),
        (["--classes", "5", "--pretrain-classes", "4"], "both halves need 2 or more classes"),
        (["--videos-per-class", "1"], "--videos-per-class at least 2"),
        (["--steps", "0"], "--steps"),
        (["--target", "1.5"], "--target in (0, 1]"),
    ],
)
def test_bad_arguments_stop_before_any_work(bench, argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err
