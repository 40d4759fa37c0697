"""Export: slowfast_tiny and the slowfast_8x8_r50 architecture (at crop 64 to stay fast) as TorchScript and ONNX,
exported once and run by TorchScript / onnxruntime at batch sizes 1 and 3 within 1e-4 of PyTorch; the CLI exports a
registered version (sqlite registry) into export/ of its run, or to --out."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, pipeline_config
from pipelines import tracking
from pipelines.cli import main
from pipelines.export import run_onnx
from slowfast.model import SlowFast, example_inputs, resolve
from slowfast.model.export import export, run_torchscript
from slowfast.serving import ClipSpec


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("preset", ["slowfast_tiny", "slowfast_8x8_r50"])
def test_export_matches_pytorch_at_two_batch_sizes(preset, fmt, tmp_path):
    torch.manual_seed(0)
    config = resolve(preset, num_classes=5)
    net = SlowFast(config).eval()
    inputs = example_inputs(config, batch=3, size=64)
    path = export(net, [x[:2] for x in inputs], fmt, tmp_path / f"{preset}.{fmt}")
    run = run_torchscript if fmt == "torchscript" else run_onnx
    for batch in (1, 3):
        clip = [x[:batch] for x in inputs]
        with torch.no_grad():
            expected = net(clip)
        got = run(path, clip)
        assert got.shape == (batch, 5)
        assert (got - expected).abs().max() < 1e-4


_EXPORT_ONNX = """
import sys, torch
from slowfast.model import SlowFast, example_inputs, resolve
from slowfast.model.export import export
config = resolve("slowfast_tiny", num_classes=5)
export(SlowFast(config).eval(), example_inputs(config, batch=2, size=32), "onnx", sys.argv[1])
"""


def test_onnx_export_prints_none_of_the_exporters_notices_about_other_models(tmp_path):
    """In a fresh process (torch.onnx says that torchvision is missing once, when it first builds its registry):
    nothing on stderr, so neither that nor the notices about the shared batch dimension or torch's pytree."""
    done = subprocess.run([sys.executable, "-W", "default", "-c", _EXPORT_ONNX, str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0 and done.stderr == ""


def test_cli_logs_the_export_to_the_version_run_or_writes_out(tmp_path, capsys):
    cfg = pipeline_config(tmp_path, tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                      "experiment": "export", "model_name": "exp"})
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=3))
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    spec = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=1, spatial_crops=3)
    version = tracking.log_model(cfg, run_id, net=net, class_names=["a", "b", "c"], spec=spec, metadata={})

    assert main(["export", "--model-uri", f"models:/exp/{version}", "--format", "onnx",
                 "--config", str(config_file)]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference from PyTorch" in printed
    logged = [f.path for f in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(run_id, "export")]
    assert logged == [f"export/exp-{version}.onnx"]

    out = tmp_path / "model.pt"
    assert main(["export", "--model-uri", f"models:/exp/{version}", "--format", "torchscript", "--out", str(out),
                 "--config", str(config_file)]) == 0
    assert out.stat().st_size > 0 and f"wrote {out}" in capsys.readouterr().out
