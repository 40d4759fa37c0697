"""SlowFast as one portable graph: TorchScript or ONNX, both pathways and the classifier, batch size dynamic.

The network takes a list [slow, fast]; exporters want plain tensor arguments, so `TwoPathway` takes the two
clips as separate inputs (named "slow" and "fast" in the ONNX graph, output "logits").
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


class TwoPathway(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return self.net([slow, fast])


def export(net: torch.nn.Module, inputs: list[torch.Tensor], fmt: str, path: str | os.PathLike) -> Path:
    """Write the network, in eval mode, as `fmt` to `path`, traced on `inputs` ([slow, fast]); every dimension
    but the batch is fixed by them. Trace with a batch of 2 or more: a batch of 1 may be specialised."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = TwoPathway(net.cpu().float().eval()).eval()
    slow, fast = (x.cpu().float().contiguous() for x in inputs)
    with torch.no_grad(), _exporters_quiet():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (slow, fast), check_trace=False), str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                model,
                (slow, fast),
                input_names=["slow", "fast"],
                output_names=["logits"],
                dynamic_shapes={"slow": {0: batch}, "fast": {0: batch}},
                dynamo=True,
                verbose=False,
            )
            program.save(str(path))
    return path


@contextlib.contextmanager
def _exporters_quiet():
    """The exporters' notices that say nothing about this network, silenced while it is exported:
    - the tracer: the network's input checks compare shapes in Python, frozen into the graph, which is what they
      check anyway (every dimension but the batch is fixed);
    - torch.onnx: that torchvision is not installed so its detection ops are skipped (SlowFast uses none), that
      both inputs share the one batch dimension (as meant), and a deprecation inside torch's own pytree code.
    Anything else they warn about still shows."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r".*The axis name: \w+ will not be used", UserWarning)
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        registration.addFilter(_not_torchvision_missing)
        try:
            yield
        finally:
            registration.removeFilter(_not_torchvision_missing)


def _not_torchvision_missing(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("torchvision is not installed")


def run_torchscript(path: str | os.PathLike, inputs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.jit.load(str(path), map_location="cpu")(*(x.cpu().float().contiguous() for x in inputs))
