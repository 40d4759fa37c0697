"""Evaluate: the reference test protocol on the committed eval shards, for a checkpoint or a registered model.

Per video, `evaluate.temporal_views` clips (of the `preprocess.eval_views` stored) x `evaluate.spatial_crops`
crops; softmax averaged per video; top-1, top-5, mean per-class accuracy and the confusion matrix. The
figures and their artifacts (result.json, confusion.png, per_class.csv) go to
storage_root/evaluations/<id>/, and to the training run's MLflow run when the model came from one.

The eval set's identity (`eval_set`: a digest of its committed shard listing and the view protocol) is
what promotion compares on: two models are ranked only on the same set.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slowfast.shards import manifest
from slowfast.shards.reader import iter_clips
from slowfast.shards.schema import ShardMeta, read_meta
from slowfast.train import confusion_matrix_png, memory_format
from slowfast.train.evaluation import score_views
from slowfast.video.sampling import choose_views

from . import tracking
from .checkpoints import LoadedModel, load_model
from .config import PipelineConfig
from .data import run_preprocess, storage_of
from .errors import PipelineError
from .storage import Storage


class EvaluateError(PipelineError, RuntimeError):
    """A model or eval set that cannot be evaluated; says which input is wrong and what to do."""


@dataclass
class EvalSet:
    classes: list[str]
    meta: ShardMeta
    shards: list[tuple[str, set[str]]]  # as the storage's filesystem takes them
    clip_indices: list[int]  # the stored views read: evaluate.temporal_views of preprocess.eval_views
    spatial_crops: int
    crop: int
    identity: str


def eval_set(cfg: PipelineConfig, store: Storage, log=print, preprocessed: dict | None = None) -> EvalSet:
    """Preprocess the val split if anything is new (unless `preprocessed`, run_preprocess's result, is
    given), then list its committed shards."""
    split = cfg.data.val_split
    out = preprocessed or run_preprocess(cfg, splits=[split], log=log)
    s = out["splits"][split]
    state = manifest.DatasetState.load(store, manifest.manifest_dir(cfg.data.dataset, split, s["prep_hash"]))
    shards = state.readable(out["plan"].splits[split].annotated_ids)
    if not shards:
        raise EvaluateError(f"{split} split: no processed videos (quarantined: {s['quarantine_reasons'] or 'none'}); "
                            f"see {s['quarantine_report']}")
    meta = read_meta(store.path(shards[0][0]), store.fs)
    e = cfg.evaluate
    views = choose_views(cfg.preprocess.eval_views, e.temporal_views)
    listing = {"dataset": cfg.data.dataset, "split": split, "prep_hash": s["prep_hash"], "classes": out["classes"],
               "shards": [(p, sorted(skip)) for p, skip in shards], "clip_indices": views,
               "spatial_crops": e.spatial_crops, "crop": cfg.train.crop_size}
    identity = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return EvalSet(list(out["classes"]), meta, [(store.path(p), skip) for p, skip in shards], views, e.spatial_crops,
                   cfg.train.crop_size, identity)


# --- scoring ---------------------------------------------------------------------------------------


def score(net: torch.nn.Module, es: EvalSet, store: Storage, batch_size: int = 8, device: str | None = None,
          mixed_precision: bool = False) -> dict:
    """Video-level results of `net` over the eval set's chosen views (see VideoAggregator.results)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fmt = memory_format(device.type)
    net = net.to(device, memory_format=fmt)
    batches = iter_clips(es.shards, mode="eval", batch_size=batch_size, crop=es.crop, meta=es.meta,
                         filesystem=store.fs, spatial_crops=es.spatial_crops, views=es.clip_indices)
    totals = score_views(net, batches, device=device, fmt=fmt, mixed_precision=mixed_precision)
    return totals.videos.results(len(es.classes), es.classes)


def evaluation_id(model_uri: str, es: EvalSet) -> str:
    return hashlib.sha256(f"{model_uri}\n{es.identity}".encode()).hexdigest()[:16]


def evaluate(cfg: PipelineConfig, model_uri: str | None = None, log=print, es: EvalSet | None = None,
             model: LoadedModel | None = None) -> dict:
    """Evaluate a model (`model`, already loaded, or the one at `model_uri`) on the config's eval set (or
    `es`); returns the figures and where the artifacts went."""
    started = time.time()
    store = storage_of(cfg)
    es = es or eval_set(cfg, store, log)
    model = model or load_model(cfg, store, model_uri)
    if model.class_names != es.classes:
        raise EvaluateError(f"{model.uri}: trained on {len(model.class_names)} classes {model.class_names[:8]}, the "
                            f"eval set has {len(es.classes)}: {es.classes[:8]}; evaluate it with the config it was "
                            "trained with")
    views = len(es.clip_indices) * es.spatial_crops
    log(f"evaluate {model.uri}: {len(es.shards)} shard(s) of {cfg.data.val_split}, {len(es.clip_indices)} temporal x "
        f"{es.spatial_crops} spatial views per video")
    res = score(model.net, es, store, batch_size=cfg.train.batch_size, mixed_precision=cfg.train.mixed_precision)
    eval_id = evaluation_id(model.uri, es)
    folder = store.uri("evaluations", eval_id)
    result = {
        "model_uri": model.uri, "train_run": model.train_run, "eval_set": es.identity, "split": cfg.data.val_split,
        "top1": res["top1"], "top5": res["top5"], "mean_class_accuracy": res["mean_class_accuracy"],
        "num_videos": res["num_videos"], "views_per_video": views, "per_class": res["per_class"],
        "confusion": res["confusion"], "artifacts": folder, "wall_s": round(time.time() - started, 1),
    }
    if res["views_per_video"]["min"] != views:
        log(f"  warning: some videos have {res['views_per_video']['min']} views, not {views} (short videos or "
            "missing clips)")
    _write_artifacts(store, ("evaluations", eval_id), result, es.classes)
    if model.train_run:
        _log_to_train_run(cfg, store, model.train_run, result, ("evaluations", eval_id))
    # Last: its presence marks the evaluation done (see `recorded`).
    store.write_bytes(f"evaluations/{eval_id}/result.json", json.dumps(result, indent=1).encode())
    log(f"evaluate: top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f}, mean class accuracy "
        f"{result['mean_class_accuracy']:.3f} on {result['num_videos']} videos; {folder}")
    return result


def recorded(cfg: PipelineConfig, model_uri: str, es: EvalSet) -> dict | None:
    """The result of an earlier evaluation of this model on this eval set, if one was written."""
    store = storage_of(cfg)
    where = f"evaluations/{evaluation_id(model_uri, es)}/result.json"
    return json.loads(store.read_bytes(where)) if store.exists(where) else None


def _write_artifacts(store: Storage, where: tuple[str, ...], result: dict, classes: list[str]) -> None:
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["class", "videos", "correct", "accuracy"])
    for c in result["per_class"]:
        writer.writerow([c["name"], c["videos"], c["correct"], "" if c["accuracy"] is None else f"{c['accuracy']:.4f}"])
    store.write_bytes("/".join((*where, "per_class.csv")), rows.getvalue().encode())
    with tempfile.TemporaryDirectory() as tmp:
        png = confusion_matrix_png(result["confusion"], classes, Path(tmp) / "confusion.png")
        store.write_bytes("/".join((*where, "confusion.png")), png.read_bytes())


def _log_to_train_run(cfg: PipelineConfig, store: Storage, run_name: str, result: dict, where: tuple[str, ...]) -> None:
    """eval_* metrics and the artifacts into the MLflow run that trained the checkpoint."""
    run_id = tracking.run_by_name(cfg, run_name)
    if run_id is None:
        return
    c = tracking.client(cfg)
    for key in ("top1", "top5", "mean_class_accuracy"):
        c.log_metric(run_id, f"eval_{key}", result[key])
    c.set_tag(run_id, "slowfast.eval_set", result["eval_set"])
    files = {name: store.read_bytes("/".join((*where, name))) for name in ("confusion.png", "per_class.csv")}
    files["result.json"] = json.dumps(result, indent=1).encode()
    tracking.log_files(cfg, run_id, files, folder="evaluation")
