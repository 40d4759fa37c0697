"""Classify video files with a trained SlowFast: decode, cut the test views, average the softmax, top-k.

`VideoClassifier` is what `python -m pipelines predict` and the MLflow pyfunc run. It needs torch, PyAV
and numpy only (no Ray, no shards), and cuts exactly the views evaluation reads from the eval shards:
frames resampled to the training frame rate, short side resized as preprocessing did, N uniformly
spaced clips, each scaled to the crop and cut into 1 or 3 spatial crops.

This module is also an MLflow flavor (`save_model`, `_load_pyfunc`): a registered model is a PyTorch
model (`mlflow.pytorch.load_model` gives the SlowFast nn.Module) whose pyfunc takes video paths or
bytes. `pipelines.registry` logs models through it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from slowfast.video import transforms
from slowfast.video.decode import DEFAULT_MAX_PIXELS, Source, VideoReader
from slowfast.video.sampling import plan_clips, slow_indices

FLAVOR_NAME = "slowfast_video"
INPUT_COLUMN = "video"


@dataclass(frozen=True)
class ClipSpec:
    """How a model's test clips are made; saved with the model so any video is cut the same way."""

    T: int
    tau: int
    alpha: int
    target_fps: float
    short_side: int
    crop: int
    temporal_views: int = 10
    spatial_crops: int = 3

    def __post_init__(self):
        if self.spatial_crops not in (1, 3):
            raise ValueError(f"spatial_crops must be 1 or 3, got {self.spatial_crops}")

    @property
    def views(self) -> int:
        return self.temporal_views * self.spatial_crops


class VideoClassifier:
    """A SlowFast network, its class names and its ClipSpec: video in, class probabilities out."""

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], spec: ClipSpec,
                 device: str | torch.device = "cpu", batch_views: int = 12):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.spec = spec
        self.device = torch.device(device)
        self.batch_views = batch_views

    def views(self, source: Source, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(slow, fast) uint8 arrays (views, 3, T, crop, crop) of one video."""
        s = self.spec
        with VideoReader(source, name=name, max_pixels=DEFAULT_MAX_PIXELS, threads=1) as reader:
            plans = plan_clips(reader.info.frames_at(s.target_fps), T=s.T, tau=s.tau, alpha=s.alpha, mode="eval",
                               num_clips=s.temporal_views)
            clips = reader.decode_windows([p.times(s.target_fps) for p in plans], short_side=s.short_side)
        fast = np.stack([transforms.to_planar(view) for clip in clips
                         for view in transforms.eval_views(clip, s.crop, s.spatial_crops)])
        return np.take(fast, slow_indices(s.alpha, s.T), axis=2), fast

    @torch.no_grad()
    def probabilities(self, source: Source, name: str | None = None) -> np.ndarray:
        """Softmax over classes, averaged over the video's views (the reference test protocol)."""
        slow, fast = self.views(source, name)
        total = torch.zeros(len(self.class_names), dtype=torch.float64)
        for i in range(0, len(fast), self.batch_views):
            batch = [transforms.normalize_tensor(torch.from_numpy(x[i:i + self.batch_views]).to(self.device))
                     for x in (slow, fast)]
            total += torch.softmax(self.model(batch).float(), dim=1).sum(0).double().cpu()
        return (total / len(fast)).numpy()

    def predict(self, sources: Iterable[Source], top_k: int = 5, names: Sequence[str] | None = None) -> list[dict]:
        """Per video: {"video", "labels", "scores"} with the top_k classes, best first."""
        out = []
        for i, source in enumerate(sources):
            name = names[i] if names else describe(source, i)
            probs = self.probabilities(source, name)
            best = np.argsort(-probs, kind="stable")[:top_k]
            out.append({"video": name, "labels": [self.class_names[j] for j in best],
                        "scores": [round(float(probs[j]), 6) for j in best]})
        return out


def describe(source: Source, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<video {index}: {len(source)} bytes>" if hasattr(source, "__len__") else f"<video {index}>"


# --- the MLflow flavor --------------------------------------------------------------------------------


def save_model(path: str, mlflow_model, *, pytorch_model: torch.nn.Module, class_names: Sequence[str],
               spec: ClipSpec, input_example: bytes, metadata: dict | None = None,
               pip_requirements: Sequence[str] | None = None, **kwargs) -> None:
    """Save as the PyTorch flavor (pickled module, so any batch size loads), with the python_function
    flavor pointing at this module: pyfunc input is a `video` column of paths or bytes.

    Called by `mlflow.models.Model.log(flavor=slowfast.serving, ...)`; see pipelines.registry.
    """
    import logging

    import mlflow.pytorch

    code = [str(Path(__file__).resolve().parent)]  # the slowfast package: loads without this project installed
    meta = {**(metadata or {}), "class_names": list(class_names), "clip_spec": asdict(spec)}
    # Pickle, not pt2: an exported graph fixes the batch size, and prediction batches views. MLflow warns
    # about pickle on every save; the warning is for models from strangers, this one is our own.
    quiet = logging.getLogger("mlflow.pytorch")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        mlflow.pytorch.save_model(pytorch_model.cpu().eval(), path, mlflow_model=mlflow_model,
                                  serialization_format="pickle", signature=signature(), metadata=meta,
                                  input_example=[input_example], code_paths=code,
                                  pip_requirements=list(pip_requirements) if pip_requirements else None, **kwargs)
    finally:
        quiet.level = level
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.flavors[FLAVOR_NAME] = {"class_names": len(class_names), "input": INPUT_COLUMN}
    mlflow_model.save(os.path.join(path, "MLmodel"))


def signature():
    """pyfunc: `video` (a path or the file's bytes) -> top-k `labels` and `scores` per video."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    # The input column is unnamed so that a plain list of paths passes schema enforcement too.
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType())]),
        outputs=Schema([ColSpec("string", "video"), ColSpec(Array("string"), "labels"),
                        ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("top_k", "long", 5)]))


class _PyFuncVideoClassifier:
    """What mlflow.pyfunc.load_model returns the predict of: paths or bytes in, a DataFrame out."""

    def __init__(self, classifier: VideoClassifier):
        self.classifier = classifier

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        top_k = int((params or {}).get("top_k", 5))
        if isinstance(model_input, (pd.DataFrame, dict)):
            columns = list(model_input.keys())
            column = INPUT_COLUMN if INPUT_COLUMN in columns else columns[0] if len(columns) == 1 else None
            if column is None:
                raise ValueError(f"expected one column of video paths or bytes (named {INPUT_COLUMN!r}), got "
                                 f"columns {columns}")
            values = model_input[column]
            sources = values.tolist() if hasattr(values, "tolist") else list(values)
        elif isinstance(model_input, (str, bytes, os.PathLike)):
            sources = [model_input]
        else:
            sources = list(model_input)
        return pd.DataFrame(self.classifier.predict([_as_source(s) for s in sources], top_k=top_k))


def _as_source(value) -> Source:
    """A pyfunc cell -> a path or bytes (JSON serving sends bytes base64-encoded, as str)."""
    if isinstance(value, (bytes, bytearray, memoryview, os.PathLike)):
        return value
    if isinstance(value, str):
        if os.path.exists(value):
            return value
        import base64
        import binascii

        try:
            return base64.b64decode("".join(value.split()), validate=True)  # MIME base64 has line breaks
        except (binascii.Error, ValueError):
            return value  # a path after all: VideoReader says it is missing
    raise TypeError(f"a video is a path or bytes, got {type(value).__name__}")


def load_classifier(model_uri: str, device: str = "cpu") -> VideoClassifier:
    """A VideoClassifier from a logged or registered model (models:/NAME@ALIAS, models:/NAME/N, runs:/...)."""
    import mlflow.pytorch
    from mlflow.models import Model
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = _download_artifact_from_uri(model_uri)
    return _classifier_from_dir(local, device, mlflow.pytorch.load_model(local, map_location=device),
                                Model.load(local))


def _classifier_from_dir(local: str, device: str, net, mlmodel) -> VideoClassifier:
    meta = mlmodel.metadata or {}
    if "clip_spec" not in meta:
        raise ValueError(f"{local}: not a model logged by this project (its MLmodel has no clip_spec metadata)")
    return VideoClassifier(net, meta["class_names"], ClipSpec(**meta["clip_spec"]), device=device)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> _PyFuncVideoClassifier:
    """MLflow's python_function loader: `data_path` is the model folder's data/ subfolder;
    model_config {"device": ...} picks the device (default: cuda when there is one)."""
    import mlflow.pytorch
    from mlflow.models import Model

    root = str(Path(data_path).parent)
    device = (model_config or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    net = mlflow.pytorch.load_model(root, map_location=device)
    return _PyFuncVideoClassifier(_classifier_from_dir(root, device, net, Model.load(root)))
