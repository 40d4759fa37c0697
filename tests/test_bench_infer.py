"""The inference benchmark end to end on tiny videos (--quick): real synthetic H.264 files, a real MLflow
registration, the in-process baseline and two real `run_infer` runs (1 and 2 scoring workers) on a real local Ray;
the figures come back in its JSON, every run scored every video, and bad arguments stop it before any work."""

from __future__ import annotations

import json
import os

import pytest

from conftest import load_benchmark

QUICK_VIDEOS = 8


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_infer.py, loaded by path and registered under its module name as `python -m pipelines bench
    infer` loads it (its dataclass looks its module up there)."""
    return load_benchmark("infer", monkeypatch)


def test_quick_run_reports_the_baseline_both_pools_and_the_ratios_over_the_same_videos(
    bench, ray_local, tmp_path, capsys
):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    result = json.loads((out / "bench_infer.json").read_text())

    assert result["config"]["preset"] == "slowfast_tiny" and result["config"]["videos"] == QUICK_VIDEOS
    assert result["config"]["views_per_video"] == 1 and result["config"]["model_uri"] == "models:/bench-infer/1"
    base = result["baseline"]
    assert base["videos"] == base["views"] == QUICK_VIDEOS
    assert base["views_per_s"] > 0 and base["views_per_cpu_s_scoring"] > base["views_per_cpu_s_all"] > 0
    assert base["cut_cpu_s_per_video"] > 0 and base["score_cpu_s_per_video"] > 0

    runs = result["runs"]
    assert [(r["workers"], r["cpus_per_worker"], r["decode_cpus"]) for r in runs.values()] == [
        (1, 1, 1),
        (2, 0.75, 0.25),
    ]
    for name, run in runs.items():
        # The same work as the baseline: every video scored once, every view, nothing quarantined.
        assert (run["videos"], run["views"], run["quarantined"]) == (QUICK_VIDEOS, QUICK_VIDEOS, 0)
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert (summary["scored_total"], summary["quarantined_total"]) == (QUICK_VIDEOS, 0)
        # One commit per video; the window leaves out the first video and ends at the last one's arrival.
        assert run["commits"] == len(run["commit_times_s"]) == QUICK_VIDEOS
        assert run["window_views"] == QUICK_VIDEOS - 2
        assert run["views_per_s"] == pytest.approx(run["window_views"] / run["window_s"])
        assert run["views_per_s_per_scoring_core"] == pytest.approx(run["views_per_s"] / run["workers"])
        # A Ray this process started: the scoring actors' and decode tasks' CPU time was sampled.
        assert run["cores"]["scoring_cores"] > 0
        assert run["views_per_cpu_s_scoring"] > run["views_per_cpu_s_all"] > 0
        assert run["cut_cpu_s_per_view"] > 0 and run["score_cpu_s_per_view"] > run["cut_cpu_s_per_view"]
    assert result["every_video_scored"] is True

    ratios, one, two = result["ratios"], runs["infer_1"], runs["infer_2"]
    assert ratios["one_worker_per_core_over_baseline"] == pytest.approx(
        one["views_per_s"] / base["views_per_s"], abs=1e-3
    )
    assert ratios["two_workers_over_one"] == pytest.approx(two["views_per_s"] / one["views_per_s"], abs=1e-3)
    assert ratios["two_workers_over_one_per_cpu_s"] == pytest.approx(
        two["views_per_cpu_s_scoring"] / one["views_per_cpu_s_scoring"], abs=1e-3
    )
    assert 1 < ratios["two_workers_over_one_bound_on_2_cores"] <= 2
    # What the 2-worker window left for the actors: the machine less the decode tasks and everything else busy.
    used = two["cores"]
    assert ratios["two_workers_other_cores"] == pytest.approx(
        max(used["machine_busy_cores"] - used["scoring_cores"] - used["decode_cores"], 0), abs=1e-3
    )
    room = os.cpu_count() - used["decode_cores"] - ratios["two_workers_other_cores"]
    assert ratios["two_workers_over_one_reachable"] == pytest.approx(
        room / one["cores"]["scoring_cores"] * ratios["two_workers_over_one_per_cpu_s"], abs=2e-3
    )
    assert result["goals"] == {"one_worker_per_core_over_baseline": 0.9, "two_workers_over_one": 1.8}

    table = (out / "bench_infer.md").read_text()
    assert table.strip() in capsys.readouterr().out
    assert "| baseline: VideoClassifier.score on views cut beforehand, 1 thread |" in table
    assert "| infer: 2 workers x 0.75 CPU, decode tasks 0.25 CPU" in table
    assert f"allow at most {ratios['two_workers_over_one_reachable']:.3f}x one worker" in table
    assert result["command"] == f"python -m pipelines bench infer --quick --out {out}" and result["command"] in table


def test_the_window_counts_one_worker_and_two_in_step_exactly_with_or_without_the_one_result_lag(bench):
    # Results ready every 2 s (one worker) or in pairs every 2 s (two in step): 0.5 and 1 view/s.
    one = [2.0, 4.0, 6.0, 8.0, 10.0]
    two = [2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0]
    for ready, rate in ((one, 0.5), (two, 1.0)):
        lagged = ready[1:] + [ready[-1] + 0.01]  # a commit when the next result arrives; the last right after
        for commit_times in (ready, lagged):
            opens, closes, views = bench.scoring_window([(t, 1) for t in reversed(commit_times)])
            assert views == len(ready) - 2 and views / (closes - opens) == pytest.approx(rate)
    with pytest.raises(RuntimeError, match="raise --videos"):
        bench.scoring_window([(1.0, 1), (2.0, 1)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--videos", "3"], "--videos 3: at least 4"),
        (["--crop", "16"], "--crop 16: at least 32"),
        (["--width", "321"], "must be even"),
        (["--quick", "--seconds", "0.5"], "a slowfast_tiny clip spans 1.07 s"),
        (["--temporal-views", "0"], "--temporal-views 0: at least 1"),
        (["--spatial-crops", "2"], "invalid choice: 2"),
        (["--preset", "resnet50"], "invalid choice: 'resnet50'"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(bench, tmp_path, capsys, argv, message):
    out = tmp_path / "never-written"
    with pytest.raises(SystemExit):
        bench.main([*argv, "--out", str(out)])
    assert message in capsys.readouterr().err
    assert not out.exists()
