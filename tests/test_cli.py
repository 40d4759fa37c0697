"""`python -m pipelines`: exit codes, config checks before any work, and what `run` says is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import slowfast.model
from pipelines import cli
from pipelines.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, main
from slowfast.model import build, count_params

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
COMMANDS = ["run", "synth", "ingest", "preprocess", "train", "evaluate", "promote", "predict", "status", "bench"]


@pytest.mark.heavy  # a process of its own
def test_help_in_a_real_process_lists_every_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m pipelines")
    for command in COMMANDS:
        assert f"\n    {command}" in done.stdout


def test_bad_config_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was built although the config is invalid")

    monkeypatch.setattr(slowfast.model, "SlowFast", no_work)
    assert main(["run", "--config", DEMO, "--set", "train.lrr=1", "--set", "model.fusion=diagonal"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"pipelines run: {DEMO}: invalid config, 2 problems:")
    assert "train.lrr: unknown key; allowed: epochs," in err
    assert "model.fusion: Input should be 'concat' or 'sum' (got 'diagonal')" in err
    # A missing config file is a config error too.
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["run"]) == EXIT_CONFIG  # --config is required
    assert "--config" in capsys.readouterr().err
    assert main(["synth", "--set", "train.epochs=1"]) == EXIT_CONFIG
    assert "--set needs --config" in capsys.readouterr().err
    assert main(["run", "--config", DEMO, "--from", "train", "--only", "evaluate"]) == EXIT_CONFIG
    assert main(["run", "--config", DEMO, "--only", "deploy"]) == EXIT_CONFIG
    assert "invalid choice: 'deploy'" in capsys.readouterr().err
    assert main(["fly"]) == EXIT_CONFIG


def tiny_data(tmp_path) -> list[str]:
    """--set overrides that point the demo at a tiny synthetic set under tmp_path."""
    videos = tmp_path / "videos"
    return [
        "--set",
        f"storage_root={tmp_path / 'storage'}",
        "--set",
        f"data.video_root={videos}",
        "--set",
        f"data.annotations.train={videos / 'annotations/train.csv'}",
        "--set",
        f"data.annotations.val={videos / 'annotations/val.csv'}",
        "--set",
        "data.synth.classes=3",
        "--set",
        "data.synth.videos_per_class=2",
        "--set",
        "data.synth.seconds=1.2",
        "--set",
        "train.epochs=1",
        "--set",
        "train.warmup_epochs=0",
        "--set",
        "train.batch_size=2",
    ]


def test_run_reports_model_overrides_from_set(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--config",
                DEMO,
                *tiny_data(tmp_path),
                "--set",
                "model.alpha=8",
                "--set",
                "train.crop_size=56",
                "--only",
                "ingest",
            ]
        )
        == EXIT_OK
    )
    out = capsys.readouterr().out
    assert "slowfast_tiny (overrides: alpha=8, fast_input=time_difference)" in out
    assert f"params         {count_params(build('slowfast_tiny', alpha=8)):,}" in out
    assert "at 56x56, 4 slow + 32 fast frames" in out
    assert "summary: run " in out and "ingest done" in out


def test_bench_model_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert main(["bench", "model"]) == EXIT_FAILED
    assert capsys.readouterr().err.strip() == "pipelines bench model: benchmarks/ not found: run from a source checkout"


def test_bench_model_passes_its_arguments_to_the_script(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    # A sibling module, imported the way a script run as `python benchmarks/bench_model.py` would.
    (bench / "_table.py").write_text("def render(argv):\n    return 'argv=' + ' '.join(argv)\n")
    (bench / "bench_model.py").write_text(
        "from _table import render\n\n"
        "def main(argv=None):\n"
        "    print(render(argv))\n"
        "    return 7 if '--fail' in argv else None\n"
    )
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    try:
        assert main(["bench", "model", "--preset", "slowfast_tiny", "--help"]) == EXIT_OK
        assert capsys.readouterr().out.strip() == "argv=--preset slowfast_tiny --help"
        assert main(["bench", "model", "--fail"]) == 7
        assert str(bench) not in sys.path
    finally:
        sys.modules.pop("_table", None)
        sys.modules.pop("bench_model", None)


@pytest.mark.heavy  # a process of its own
def test_a_bad_checkpoint_is_one_line_and_exit_1_without_a_traceback(tmp_path, capsys):
    """--model-uri and train.init_from naming a missing file, or a file that is no checkpoint: the message alone,
    before any video is read. A file that is no checkpoint goes furthest (it is read and unpickling is tried): each
    command's shows what a shell sees, in a process of its own (the two side by side); a missing file, which stops a
    step short of that on the same path, in this process."""
    garbage, missing = tmp_path / "garbage.pt", tmp_path / "missing.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 8)
    where = ["--set", f"storage_root={tmp_path / 'storage'}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    in_a_shell = {
        ("evaluate", "--model-uri", str(garbage)): f"pipelines evaluate: --model-uri {garbage}: neither a torch "
        "checkpoint nor a pickle",
        ("run", "--set", f"train.init_from={garbage}"): f"pipelines run: train.init_from {garbage}: ",
    }
    here = {
        ("evaluate", "--model-uri", str(missing)): f"pipelines evaluate: --model-uri {missing}: no checkpoint there",
        ("run", "--set", f"train.init_from={missing}"): f"pipelines run: train.init_from: train.init_from {missing}: "
        "no checkpoint there",
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = {
        says: subprocess.Popen(
            [sys.executable, "-m", "pipelines", command, "--config", DEMO, *where, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for (command, *args), says in in_a_shell.items()
    }
    finished = {says: (proc.communicate(timeout=300)[1], proc.returncode) for says, proc in started.items()}
    for says, (err, code) in finished.items():
        assert code == EXIT_FAILED, err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith(says), err
    for (command, *args), says in here.items():
        assert main([command, "--config", DEMO, *where, *args]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith(says), err
    assert not (tmp_path / "storage" / "shards").exists()  # nothing was decoded


def test_a_checkpoint_error_from_any_command_is_its_message_and_exit_1(capsys, monkeypatch):
    from slowfast.model import CheckpointError

    def refuses(args, config):
        raise CheckpointError("x.pyth: unrecognised checkpoint format (first keys: a, b)")

    monkeypatch.setattr(cli, "cmd_status", refuses)
    assert main(["status", "--config", DEMO]) == EXIT_FAILED
    assert capsys.readouterr().err == "pipelines status: x.pyth: unrecognised checkpoint format (first keys: a, b)\n"
