"""`ray job submit` against a real head node: `ray start --head` (tests/multinode.py's LocalCluster, one node with
2 CPUs, token authentication on as Ray 2.60 does for local clusters), the workflow submitted with the working dir
and cluster/runtime_env.local.yaml, as the README does, polled until SUCCEEDED, then the registered model read
back from MLflow."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from multinode import LocalCluster


def test_ray_job_submit_runs_the_workflow_and_registers_a_model(synth_set, tmp_path):
    head = LocalCluster(tmp_path / "cluster", head_cpus=2)
    try:
        out = tmp_path / "job"
        videos = synth_set
        # Exactly the README's command, with absolute paths (the job runs in Ray's copy of the working dir), on a
        # smaller workload than the demo's (an epoch of 3 steps).
        submission = head.submit(
            "python",
            "-m",
            "pipelines",
            "run",
            "--config",
            "configs/demo.yaml",
            "--set",
            f"storage_root={out}",
            "--set",
            f"data.video_root={videos}",
            "--set",
            f"data.annotations.train={videos / 'annotations/train.csv'}",
            "--set",
            f"data.annotations.val={videos / 'annotations/val.csv'}",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "--set",
            "mlflow.model_name=job-test",
            "--set",
            "preprocess.short_side=48",
            "--set",
            "preprocess.clips_per_video=1",
            "--set",
            "preprocess.eval_views=2",
            "--set",
            "evaluate.temporal_views=2",
            "--set",
            "train.crop_size=32",
            "--set",
            "train.scale_jitter=[40,48]",
            "--set",
            "train.epochs=1",
            "--set",
            "train.warmup_epochs=0",
            "--set",
            "train.batch_size=4",
            options=("--working-dir", ".", "--runtime-env", "cluster/runtime_env.local.yaml"),
        )
        status, logs = head.wait(submission, timeout=900)
        assert status == "SUCCEEDED", logs[-4000:]
    finally:
        head.stop()  # this head only: `ray stop` would stop every Ray on the machine

    assert "summary: run " in logs and "models:/job-test/1" in logs
    summaries = list((out / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["model_uri"] == "models:/job-test/1" and summary["promoted"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("job-test", "champion")
    assert str(champion.version) == "1" and champion.tags["slowfast.promotion.decision"] == "promoted"
