"""The train benchmark end to end on a tiny synthetic set: real preprocess, a real one-epoch TorchTrainer run
through a real local Ray and MLflow (sqlite), and the in-memory baseline; figures come back in its JSON."""

from __future__ import annotations

import json

import pytest

from slowfast.train.optim import cpu_bf16

from conftest import load_benchmark


def load_bench():
    """benchmarks/bench_train.py, loaded by path as `python -m pipelines bench train` loads it."""
    return load_benchmark("train")


def test_bench_train_reports_both_cases_per_precision_the_ratios_and_the_data_wait(ray_local, tmp_path, capsys):
    out = tmp_path / "bench_train.json"
    bench = load_bench()
    assert (
        bench.main(
            [
                "--steps",
                "3",
                "--warmup",
                "1",
                "--batch-size",
                "4",
                "--crop",
                "32",
                "--classes",
                "4",
                "--videos-per-class",
                "2",
                "--workdir",
                str(tmp_path / "work"),
                "--json",
                str(out),
            ]
        )
        == 0
    )

    result = json.loads(out.read_text())
    # bf16 runs where autocast gives bf16; on a CPU without it, a second fp32 run would measure nothing new.
    bf16 = cpu_bf16().supported
    assert list(result["precisions"]) == (["fp32", "bf16"] if bf16 else ["fp32"])
    assert bool(result["skipped"]) is not bf16 and all(cpu_bf16().reason in why for why in result["skipped"].values())
    for name, run in result["precisions"].items():
        assert run["mixed_precision"] == (name == "bf16") and run["precision"]
        assert run["autocast"] is (name == "bf16" and run["autocast"])  # fp32 never autocasts
        shards, memory = run["cases"]["shards"], run["cases"]["memory"]
        assert shards["clips_per_s"] > 0 and memory["clips_per_s"] > 0 and shards["wall_clips_per_s"] > 0
        assert memory["clips_per_cpu_s"] > 0
        assert shards["steps"] == memory["steps"] == 3
        # One epoch holds warm-up + timed steps: 4 train videos (2 a class, one of them to val) x 4 clips / 4 a step.
        assert shards["steps_in_epoch"] == 4
        assert run["ratio_shards_over_memory"] == pytest.approx(shards["clips_per_s"] / memory["clips_per_s"], abs=1e-3)
        assert 0 <= run["data_wait"] <= 1 and run["data_wait"] == pytest.approx(shards["data_wait"], abs=1e-4)
        assert 0 <= shards["epoch_data_wait"] <= 1
        assert len(shards["step_ms"]) == 4 and all(ms > 0 for ms in shards["step_ms"])
    assert result["config"]["clips_per_video"] == 4 and result["config"]["train_clips"] == 16
    # The memory case runs with the train worker's threads: the demo's train.threads_per_worker.
    assert result["config"]["cpus_per_worker"] == 1 and result["config"]["data_cpus"] == 1
    assert result["config"]["threads"] == 2

    table = capsys.readouterr().out
    assert "| fp32      | shards: Ray Data -> TorchTrainer" in table
    assert ("| bf16      | memory: the same train_step" in table) is bf16
    assert ("bf16: not run:" in table) is not bf16
    # A benchmark keeps no checkpoints; the shards and the MLflow db stay for the next run.
    assert not any((tmp_path / "work" / "storage" / "checkpoints").glob("bench-*/epoch-*"))
    assert (tmp_path / "work" / "mlflow.db").is_file()


def test_bench_train_refuses_an_unknown_precision(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp16"])
    assert "--precision takes fp32 and/or bf16" in capsys.readouterr().err
