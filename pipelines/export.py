"""`python -m pipelines export`: a registered (or logged) model as one TorchScript or ONNX file, checked against
PyTorch on a real clip before it is kept, then logged under export/ of the version's run (models:/ URIs) or
written to --out."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from slowfast.model.export import SUFFIX, export, run_torchscript
from slowfast.train import clip_inputs

from . import tracking
from .config import PipelineConfig
from .errors import PipelineError

TOLERANCE = 1e-4


class ExportError(PipelineError, RuntimeError):
    pass


def example_clip(classifier, views: int = 3) -> list[torch.Tensor]:
    """[slow, fast] of `views` test views of the logged input example, cut as serving cuts them (repeated when
    the model's ClipSpec makes fewer)."""
    fast, slow_index = classifier.views(tracking.example_video(), "example")
    fast = torch.from_numpy(fast[[i % len(fast) for i in range(views)]])
    index = torch.as_tensor(slow_index, dtype=torch.long).expand(len(fast), -1)
    return clip_inputs({"fast": fast, "slow_index": index}, torch.contiguous_format)


def run_onnx(path: str | Path, inputs: list[torch.Tensor]) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnxruntime: pip install -c constraints.txt -e '.[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    slow, fast = (x.cpu().float().contiguous().numpy() for x in inputs)
    return torch.from_numpy(session.run(["logits"], {"slow": slow, "fast": fast})[0])


def max_difference(net: torch.nn.Module, fmt: str, path: Path, inputs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        expected = net.cpu().float().eval()([x.cpu().float() for x in inputs])
    got = run_torchscript(path, inputs) if fmt == "torchscript" else run_onnx(path, inputs)
    if got.shape != expected.shape:
        raise ExportError(f"{path}: exported graph gives logits {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max())


def export_model(config: PipelineConfig | None, uri: str, fmt: str, out: str | None, log=print) -> dict:
    """Export, check at batch sizes 1 and 3 on the example clip, then keep the file (out, or the registered
    version's run when uri is models:/...). Returns {"path" or "artifact_uri", "max_abs_diff"}."""
    if out is None and not uri.startswith("models:/"):
        raise ExportError(f"{uri}: only a models:/ URI has a run to log the export to; give --out PATH")
    try:
        classifier = tracking.load_registered(config, uri)
    except tracking.TrackingError as exc:
        raise ExportError(str(exc)) from None
    net = classifier.model.cpu().float().eval()
    clip = example_clip(classifier)
    with tempfile.TemporaryDirectory() as tmp:
        name = Path(out).name if out else f"{uri.removeprefix('models:/').replace('/', '-')}{SUFFIX[fmt]}"
        path = Path(tmp) / name
        export(net, [x[:2] for x in clip], fmt, path)
        diff = max(max_difference(net, fmt, path, [x[:n] for x in clip]) for n in (1, 3))
        log(f"{fmt}: max abs difference from PyTorch on the example clip (batch 1 and 3): {diff:.3g}")
        if not math.isfinite(diff) or diff > TOLERANCE:
            raise ExportError(
                f"{uri}: the {fmt} graph's logits differ from PyTorch's by {diff:.3g} "
                f"(> {TOLERANCE}); the file is not kept"
            )
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, out)
            log(f"wrote {out}")
            return {"path": str(out), "max_abs_diff": diff}
        artifact = tracking.log_export(config, uri, path)
        log(f"logged {artifact}")
        return {"artifact_uri": artifact, "max_abs_diff": diff}
