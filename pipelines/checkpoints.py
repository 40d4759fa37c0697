"""Finding and loading trained models: Ray Train's checkpoints under storage_root, or registered versions.

Training writes storage_root/checkpoints/<run-name>/epoch-NNNN/model.pt; evaluation, registration and
fine-tuning read them back through here, or a models:/ / runs:/ URI through `tracking`.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from slowfast.model.checkpoint import CheckpointError, build_from_checkpoint

from . import tracking
from .config import PipelineConfig
from .errors import PipelineError
from .storage import Storage

CHECKPOINT_FILE = "model.pt"
SCORE = "val_top1"  # the metric that ranks checkpoints (CheckpointConfig keeps the best N)


class ModelNotFound(PipelineError, RuntimeError):
    """A model location that holds no usable model; says what was expected there."""


@dataclass
class LoadedModel:
    net: torch.nn.Module
    class_names: list[str]
    uri: str  # as the user gave it, or the checkpoint picked
    train_run: str | None = None  # the training run's name when the model is one of its checkpoints


def storage_fs(store: Storage):
    """On S3, Ray Train takes bucket/prefix plus the filesystem (it carries endpoint and region)."""
    return store.fs if store.is_s3 else None


def as_uri(store: Storage, path: str) -> str:
    """A checkpoint path as Ray Train reports it (bucket/key on S3) -> as the user writes it."""
    if store.is_s3 and not path.startswith("s3://"):
        return f"s3://{path}"
    return path


def ranked(result) -> list:
    """A Ray Train Result's (checkpoint, metrics) pairs, best SCORE first."""
    return sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get(SCORE, -math.inf), reverse=True)


def finished_result(store: Storage, run_name: str, epochs: int):
    """The run's Result when its checkpoints already cover `epochs` epochs, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(store.path("checkpoints", run_name), storage_filesystem=storage_fs(store))
    except RuntimeError:  # no such run folder, or no checkpoint snapshot in it yet
        return None
    return result if (result.metrics or {}).get("epoch", 0) >= epochs else None


def best_checkpoint_of_latest_run(store: Storage) -> str | None:
    """The best checkpoint (by val top-1) of the training run that checkpointed last, or None."""
    from ray.train import Result

    files = store.fs.get_file_info(pafs.FileSelector(store.path("checkpoints"), recursive=True, allow_not_found=True))
    newest = max(
        (f for f in files if f.path.endswith("/" + CHECKPOINT_FILE)), key=lambda f: f.mtime_ns or 0, default=None
    )
    if newest is None:
        return None
    run_dir = posixpath.dirname(posixpath.dirname(newest.path))
    best = ranked(Result.from_path(run_dir, storage_filesystem=storage_fs(store)))
    return as_uri(store, best[0][0].path) if best else as_uri(store, posixpath.dirname(newest.path))


def load_model(cfg: PipelineConfig, store: Storage, model_uri: str | None) -> LoadedModel:
    """A checkpoint (file or Ray Train checkpoint folder, local or s3://), a registry or run URI
    (models:/NAME@ALIAS, models:/NAME/N, runs:/ID/model), or None: the best checkpoint of the
    pipeline's newest training run."""
    if model_uri is None:
        model_uri = best_checkpoint_of_latest_run(store)
        if model_uri is None:
            raise ModelNotFound(
                f"no checkpoint under {store.uri('checkpoints')}: run `python -m pipelines train "
                "--config ...` first, or pass --model-uri"
            )
    if model_uri.startswith(("models:/", "runs:/")):
        try:
            classifier = tracking.load_registered(cfg, model_uri)
        except tracking.TrackingError as exc:
            raise ModelNotFound(str(exc)) from None
        return LoadedModel(classifier.model, classifier.class_names, model_uri)
    return load_from_checkpoint(store, model_uri)


def read_checkpoint(store: Storage, uri: str, key: str = "--model-uri") -> tuple[io.BytesIO, str]:
    """The bytes of a checkpoint file (local or s3://; a Ray Train checkpoint folder means its model.pt),
    as an in-memory file named `uri`, and the file's path. `key` names the setting the location came
    from, for the error."""
    fs, path = store.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ModelNotFound(
            f"{key} {uri}: no checkpoint there (expected a checkpoint file, a folder holding "
            f"{CHECKPOINT_FILE}, or models:/NAME@ALIAS)"
        )
    with fs.open_input_file(path) as f:
        data = io.BytesIO(f.read())
    data.name = uri
    return data, path


def load_from_checkpoint(store: Storage, uri: str) -> LoadedModel:
    """A checkpoint written by `pipelines train`: the file, or the Ray Train checkpoint folder holding it, read
    weights-only."""
    data, path = read_checkpoint(store, uri)
    try:
        net, report = build_from_checkpoint(data)
    except CheckpointError as exc:  # its message starts with the location
        raise ModelNotFound(f"--model-uri {exc}") from None
    if "class_names" not in report.extra:
        raise ModelNotFound(f"--model-uri {uri}: not a checkpoint written by `pipelines train` (no class names in it)")
    run = Path(path).parent.parent.name if Path(path).parent.name.startswith("epoch-") else None
    return LoadedModel(net, list(report.extra["class_names"]), uri, run)
