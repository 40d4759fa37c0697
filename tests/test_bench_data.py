"""The data benchmark end to end in its quick mode, as a user runs it (`python -m pipelines bench data`, a process
of its own: it starts a fresh local Ray of 1 CPU, then 2): real H.264 videos through the real decoder, the shard
loader and the preprocess code, and the real Ray Data job; figures come back in its JSON and its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_benchmark

SIZES = ("340x256", "640x360")


@pytest.mark.heavy
def test_bench_data_quick_times_every_case_on_both_sizes_and_the_ray_job(tmp_path):
    out = tmp_path / "bench_data.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "bench",
            "data",
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["args"]["videos"] == 1 and result["args"]["repeats"] == 1

    for size in SIZES:
        # a. every loader case timed once (--quick) over the same clips. Figures only: no speed is asserted.
        loader = result["loader"][size]
        cases = ("ours_jpeg", "ours_raw", "ours_jpeg_inputs", "jpeg_bound", "on_the_fly", "pyslowfast")
        assert all(loader[c]["per_s_cpu"] > 0 and len(loader[c]["cpu_s"]) == 1 for c in cases)
        assert loader["clips_per_call"] == 4
        # b. the preprocess cases and their baselines, the decoder alone among them.
        pre = result["preprocess"][size]
        assert all(
            pre[c]["s_per_video_cpu"] > 0
            for c in ("train", "eval", "decode_all", "eval_decode", "decode_all_kept", "decode_only")
        )
        # 10 views' distinct frames of a 4 s, 30 fps video (the views overlap: fewer than 10 x 32)
        assert 32 < pre["eval_decode"]["distinct_frames_per_video"] <= 120
        # c. the same clips in both formats, JPEG far smaller.
        jpeg, raw = result["bytes"][size]["jpeg"], result["bytes"][size]["raw"]
        assert jpeg["clips"] == raw["clips"] > 0 and jpeg["bytes_per_clip"] < raw["bytes_per_clip"] / 5

    # d. the Ray job: every video decoded on each Ray, one actor per CPU, the actors' CPU read from /proc.
    ray = result["ray"]
    for workers in (1, 2):
        run = ray[str(workers)]
        assert run["clips"] == 8 * 2 and len(run["arrivals_s"]) == 8  # 8 videos, K = 2, a record for each
        assert run["actors"] == workers and len(run["actor_started_s"]) == workers
        # Read between the first and the last record back: a burst of records can leave a window in which the
        # actors had already finished, so only the range is certain.
        assert run["actor_cores"] >= 0 and 0 <= run["machine_busy_cores"] <= os.cpu_count()
        assert run["steady_videos_per_s"] is None  # too few batches in a quick run to call a steady state

    table = done.stdout
    assert "| a. JPEG loader vs JPEG-decode bound (fraction reached)" in table
    assert "| b. preprocess ms/video/core, eval, 10 views, vs a full decode to RGB (kept swscale context)" in table
    assert "| d. Ray Data preprocess videos/s, end to end, 2 workers vs 1" in table
    assert "the decoder alone (no conversion)" in table and "would still be" in table
    assert "2 worker(s): first record after" in table


def test_bench_data_refuses_an_unknown_part(capsys):
    bench = load_benchmark("data")
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "a,e"])
    assert "--only takes parts among a, b, c, d" in capsys.readouterr().err
