"""The ablation benchmark end to end on a tiny synthetic set: real preprocess (the session's local Ray), real
trainings in two spawned workers and in this process, a real MLflow (sqlite); a re-run trains nothing, a new seed
trains only that seed. And the findings' arithmetic on made-up figures."""

from __future__ import annotations

import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

from slowfast.model import SlowFast, count_params, resolve

from conftest import load_benchmark, pipeline_config


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_ablate.py, loaded by path and registered as `python -m pipelines bench ablate` loads it
    (the spawned training workers find its functions by module name)."""
    return load_benchmark("ablate", monkeypatch)


def test_study_writes_results_table_plot_and_mlflow_runs_then_resumes(bench, ray_local, synth_set, tmp_path, capsys):
    cfg = pipeline_config(
        tmp_path,
        synth_set,
        train={"batch_size": 4},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ablate-test"},
    )
    config = tmp_path / "ablate.yaml"
    config.write_text(cfg.to_yaml())
    out = tmp_path / "study"
    argv = ["--config", str(config), "--out", str(out), "--variants", "slow_only,slowfast", "--steps", "3"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    # One seed, both variants at once in two spawned workers.
    assert bench.main([*argv, "--seeds", "1", "--workers", "2", "--threads", "1"]) == 0
    assert "2 trained now, 0 done before" in capsys.readouterr().out
    first = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert len(first) == 2

    # Re-run: every training is done, nothing is trained or logged again.
    assert bench.main([*argv, "--seeds", "1", "--workers", "1"]) == 0
    assert "0 trained now, 2 done before" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == first
    experiment = client.get_experiment_by_name("ablate-test")
    assert len(client.search_runs([experiment.experiment_id])) == 2

    # A second seed trains that seed only (here, in this process); the first seed's results are untouched.
    assert bench.main([*argv, "--seeds", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 trained now, 2 done before" in printed
    results = {p: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert sorted((r["variant"], r["seed"]) for r in results.values()) == [
        ("slow_only", 0),
        ("slow_only", 1),
        ("slowfast", 0),
        ("slowfast", 1),
    ]
    assert sorted((results[p]["variant"], results[p]["seed"]) for p in first) == [("slow_only", 0), ("slowfast", 0)]
    for r in results.values():
        assert r["steps"] == 3 and 0 <= r["top1"] <= 1 and r["val_videos"] == 4 and r["wall_s"] > 0
        # the learning curve: val top-1 after every step (--eval-every defaults to a third of --steps), the last
        # point the final figure
        assert [s for s, _ in r["curve"]] == [1, 2, 3] and r["curve"][-1][1] == r["top1"]
    slow = next(r for r in results.values() if r["variant"] == "slow_only")
    assert slow["overrides"] == {"arch": "slow"}
    assert slow["params"] == count_params(SlowFast(resolve("slowfast_tiny", arch="slow", num_classes=4)))

    # The table, plot and summary over both seeds.
    table = (out / "ablation.md").read_text()
    assert "| slow_only " in table and "| slowfast " in table and "2 trained now, 2 done before" in table
    assert "train top-1" in table.splitlines()[2]
    assert "every SlowFast variant beats Slow-only" in table and "n/a** grayscale" in table
    assert table.strip() in printed  # printed as written
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["slow_only", "slowfast"]
    assert [len(v["top1"]) for v in summary["variants"]] == [2, 2]
    slow_runs = sorted((r for r in results.values() if r["variant"] == "slow_only"), key=lambda r: r["seed"])
    assert summary["variants"][0]["top1"] == [r["top1"] for r in slow_runs]
    assert summary["variants"][0]["curve"] == [
        [step, pytest.approx(statistics.fmean(r["curve"][step - 1][1] for r in slow_runs))] for step in (1, 2, 3)
    ]

    # One MLflow run per training, whichever process trained it.
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        mine = next(r for r in results.values() if r["mlflow_run_id"] == run.info.run_id)
        assert run.data.tags["ablate.variant"] == mine["variant"] and run.data.params["seed"] == str(mine["seed"])
        assert run.data.metrics["top1"] == pytest.approx(mine["top1"])
        assert run.data.metrics["params"] == mine["params"] and run.data.metrics["gflops"] > 0
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_top1")] == [
            tuple(point) for point in mine["curve"]
        ]
        if mine["variant"] == "slow_only":
            assert run.data.params["model.arch"] == "slow"


def row(bench, variant: str, top1: list[float]) -> dict:
    return {
        "variant": variant,
        "group": bench.VARIANTS[variant][0],
        "top1_mean": statistics.fmean(top1),
        "top1_std": statistics.stdev(top1),
    }


def test_findings_compare_gaps_with_the_seed_spread(bench):
    rows = [
        row(bench, "slow_only", [0.50, 0.52, 0.54]),
        row(bench, "fast_only", [0.70, 0.72, 0.74]),
        row(bench, "slowfast", [0.80, 0.82, 0.84]),
        row(bench, "grayscale", [0.77, 0.80, 0.83]),
        row(bench, "time_to_channel", [0.53, 0.55, 0.57]),
    ]
    beats, fast, gray = bench.findings(rows)
    # time_to_channel is 0.03 above Slow-only, less than the stds added (0.02 + 0.02): not beyond the spread.
    assert beats["passed"] is False and "time_to_channel +0.030 (<= 0.040)" in beats["detail"]
    assert fast["passed"] is True and "time_to_channel" in fast["detail"]  # named: below Fast-only
    assert gray["passed"] is True and "-0.020, spread 0.050" in gray["detail"]

    rows[-1] = row(bench, "time_to_channel", [0.60, 0.62, 0.64])
    assert bench.findings(rows)[0]["passed"] is True
    rows[3] = row(bench, "grayscale", [0.70, 0.71, 0.72])  # 0.11 below rgb, spread 0.03
    assert bench.findings(rows)[2]["passed"] is False
    assert bench.findings(rows[:1])[1]["passed"] is None  # nothing to compare: n/a, not a pass


def test_slow_only_ceiling_counts_fast_only_pairs_as_coin_flips(bench):
    from slowfast.video.synth import CLASSES

    labels = [c.label for c in CLASSES]
    assert bench.slow_only_ceiling(labels[:8]) == pytest.approx(6 / 8)  # 4 slow classes, 2 pairs
    assert bench.slow_only_ceiling(labels[:2]) == 1.0  # "stripes drifting up" without its partner
    assert bench.slow_only_ceiling(labels) == pytest.approx(8 / 11)
    assert bench.slow_only_ceiling(["abseiling", "archery"]) is None


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--variants", "slow_only,warp_drive"], "--variants: unknown warp_drive"),
        (["--eval-every", "-1"], "--eval-every at least 0"),
        (["--steps", "0"], "--steps"),
        (["--seeds", "0"], "--seeds"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_arguments_stop_before_any_work(bench, argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err
