"""Export: the slowfast_8x8_r50 architecture (at crop 64 to stay fast) and slowfast_tiny as TorchScript and ONNX,
exported once and run by TorchScript / onnxruntime at batch sizes 1 and 3 within 1e-4 of PyTorch (slowfast_tiny
through the CLI, whose check is the same); the CLI exports a registered version (sqlite registry) into export/ of its
run, or to --out.

Every network here has random weights and batch norm statistics: a freshly built one zero-initialises the last
batch norm of each residual block, so every branch adds nothing and an exporter's mistake inside one would pass."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from pipelines import tracking
from pipelines.cli import main
from pipelines.export import run_onnx
from slowfast.model import SlowFast, SlowFastConfig, example_inputs, resolve
from slowfast.model.export import export, run_torchscript
from slowfast.serving import ClipSpec

from conftest import REPO, pipeline_config

TOLERANCE = 1e-4  # max abs difference of the logits, which are of order 10 here (see randomised)
LAST_BN = ".c.bn"  # the batch norm ending each bottleneck's branch (a, b, c), zero-initialised when built
BRANCH_CONV = "slow.res3.0.b.conv"  # a conv inside a residual branch, away from the input and the head


def randomised(net: SlowFast, seed: int = 0) -> SlowFast:
    """`net` with every weight, bias, batch norm scale and shift and running statistic drawn at random: convs
    and the classifier He-normal; batch norm scales in [0.5, 1.5], except the last of each residual block in
    [0.2, 0.5] (so that its branch counts, and the 16 blocks of an R50 keep the logits of order 10, where
    TOLERANCE is a hundred times float32's rounding error); shifts and running means in [-0.2, 0.2], running
    variances in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(low + (high - low) * torch.rand(t.shape, generator=g))

    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    uniform(m.bias, -0.2, 0.2)
            elif isinstance(m, nn.BatchNorm3d):
                uniform(m.weight, *((0.2, 0.5) if name.endswith(LAST_BN) else (0.5, 1.5)))
                uniform(m.bias, -0.2, 0.2)
                uniform(m.running_mean, -0.2, 0.2)
                uniform(m.running_var, 0.5, 1.5)
    return net


@dataclass
class Reference:
    """A randomised network, its inputs (a batch of 3 at 64 px) and PyTorch's logits at batch sizes 1 and 3."""

    config: SlowFastConfig
    net: SlowFast
    inputs: list[torch.Tensor]
    logits: dict[int, torch.Tensor]


@pytest.fixture(scope="module", params=["slowfast_tiny", "slowfast_8x8_r50"])
def reference(request) -> Reference:
    """Built, randomised and run once per preset for the tests below (an R50's forward passes take seconds)."""
    config = resolve(request.param, num_classes=5)
    net = randomised(SlowFast(config)).eval()
    inputs = example_inputs(config, batch=3, size=64)
    with torch.no_grad():
        logits = {batch: net([x[:batch] for x in inputs]) for batch in (1, 3)}
    return Reference(config, net, inputs, logits)


def branch_moves_logits(net: SlowFast, clip: list[torch.Tensor]) -> float:
    """How far the logits move when BRANCH_CONV's weights get noise of 10% of their mean size (then back as
    they were)."""
    with torch.no_grad():
        before = net(clip)
        weight = net.get_submodule(BRANCH_CONV).weight
        kept = weight.clone()
        weight.add_(0.1 * weight.abs().mean() * torch.randn_like(weight))
        moved = float((net(clip) - before).abs().max())
        weight.copy_(kept)
    return moved


def test_randomised_branches_reach_the_logits(reference):
    """What the export tests would miss on a freshly built network: a wrong conv inside a residual branch."""
    torch.manual_seed(0)
    clip = [x[:1] for x in reference.inputs]
    # The branch's last batch norm scales it to zero: only the shortcut is seen.
    assert branch_moves_logits(SlowFast(reference.config).eval(), clip) == 0.0
    moved = branch_moves_logits(reference.net, clip)
    assert moved > 100 * TOLERANCE, moved
    scale = float(reference.logits[3].abs().max())
    assert 1 < scale < 100, scale  # logits of order 10: float32 rounds them to ~1e-6, far inside TOLERANCE


# slowfast_tiny: through the CLI, in test_cli_logs_the_export_to_the_version_run_or_writes_out.
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("reference", ["slowfast_8x8_r50"], indirect=True)
def test_export_matches_pytorch_at_two_batch_sizes(reference, fmt, tmp_path):
    path = export(reference.net, [x[:2] for x in reference.inputs], fmt, tmp_path / f"net.{fmt}")
    run = run_torchscript if fmt == "torchscript" else run_onnx
    for batch in (1, 3):
        got = run(path, [x[:batch] for x in reference.inputs])
        assert got.shape == (batch, 5)
        assert (got - reference.logits[batch]).abs().max() < TOLERANCE


_EXPORT_ONNX = """
import sys, torch
from slowfast.model import SlowFast, example_inputs, resolve
from slowfast.model.export import export
config = resolve("slowfast_tiny", num_classes=5)
export(SlowFast(config).eval(), example_inputs(config, batch=2, size=32), "onnx", sys.argv[1])
"""


@pytest.mark.heavy  # a process of its own
def test_onnx_export_prints_none_of_the_exporters_notices_about_other_models(tmp_path):
    """In a fresh process (torch.onnx says that torchvision is missing once, when it first builds its registry):
    nothing on stderr, so neither that nor the notices about the shared batch dimension or torch's pytree."""
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", _EXPORT_ONNX, str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0 and done.stderr == ""


def test_cli_logs_the_export_to_the_version_run_or_writes_out(tmp_path, capsys):
    cfg = pipeline_config(
        tmp_path,
        tmp_path,
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "export", "model_name": "exp"},
    )
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    net = randomised(SlowFast(cfg.model.to_slowfast_config(num_classes=3)))
    run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg)).info.run_id
    spec = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=1, spatial_crops=3)
    version = tracking.log_model(cfg, run_id, net=net, class_names=["a", "b", "c"], spec=spec, metadata={})

    assert (
        main(["export", "--model-uri", f"models:/exp/{version}", "--format", "onnx", "--config", str(config_file)]) == 0
    )
    printed = capsys.readouterr().out
    assert exported_difference(printed) < TOLERANCE, printed
    logged = [f.path for f in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(run_id, "export")]
    assert logged == [f"export/exp-{version}.onnx"]

    out = tmp_path / "model.pt"
    assert (
        main(
            [
                "export",
                "--model-uri",
                f"models:/exp/{version}",
                "--format",
                "torchscript",
                "--out",
                str(out),
                "--config",
                str(config_file),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert exported_difference(printed) < TOLERANCE, printed
    assert out.stat().st_size > 0 and f"wrote {out}" in printed


def exported_difference(printed: str) -> float:
    """How far `pipelines export` said its graph's logits are from PyTorch's at batch sizes 1 and 3 (export_model's
    check, on the logged input example); inf if it did not say."""
    said = re.search(r"max abs difference from PyTorch on the example clip \(batch 1 and 3\): (\S+)", printed)
    return float(said.group(1)) if said else float("inf")
