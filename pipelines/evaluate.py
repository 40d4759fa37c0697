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
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slowfast.shards import manifest
from slowfast.shards.reader import iter_clips
from slowfast.shards.schema import ShardMeta, read_meta
from slowfast.train import confusion_matrix_png, memory_format
from slowfast.train.evaluation import EvalTotals, score_views
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
        raise EvaluateError(
            f"{split} split: no processed videos (quarantined: {s['quarantine_reasons'] or 'none'}); "
            f"see {s['quarantine_report']}"
        )
    meta = read_meta(store.path(shards[0][0]), store.fs)
    e = cfg.evaluate
    views = choose_views(cfg.preprocess.eval_views, e.temporal_views)
    listing = {
        "dataset": cfg.data.dataset,
        "split": split,
        "prep_hash": s["prep_hash"],
        "classes": out["classes"],
        "shards": [(p, sorted(skip)) for p, skip in shards],
        "clip_indices": views,
        "spatial_crops": e.spatial_crops,
        "crop": cfg.train.crop_size,
    }
    identity = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return EvalSet(
        list(out["classes"]),
        meta,
        [(store.path(p), skip) for p, skip in shards],
        views,
        e.spatial_crops,
        cfg.train.crop_size,
        identity,
    )


# --- scoring ---------------------------------------------------------------------------------------


def score(
    net: torch.nn.Module,
    es: EvalSet,
    store: Storage,
    batch_size: int = 8,
    device: str | None = None,
    mixed_precision: bool = False,
) -> dict:
    """Video-level results of `net` over the eval set's chosen views (see VideoAggregator.results)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fmt = memory_format(device.type)
    net = net.to(device, memory_format=fmt)
    batches = iter_clips(
        es.shards,
        mode="eval",
        batch_size=batch_size,
        crop=es.crop,
        meta=es.meta,
        filesystem=store.fs,
        spatial_crops=es.spatial_crops,
        views=es.clip_indices,
    )
    totals = score_views(net, batches, device=device, fmt=fmt, mixed_precision=mixed_precision)
    return totals.videos.results(len(es.classes), es.classes)


def score_on_ray(cfg: PipelineConfig, net: torch.nn.Module, es: EvalSet, store: Storage) -> dict:
    """`score` on the cluster: CPU tasks read and decode the eval shards' chosen views, an actor pool set up
    like infer's (`infer.*`: GPUs or CPU actors, and infer.mixed_precision: evaluate scores as infer does, not
    as training's per-epoch validation) scores them, the driver merges the per-batch totals. The same loop
    (score_views) and views as `score`, so the same figures."""
    import ray

    from .infer import decode_tasks, pack_model, scoring_actors
    from .ray_runtime import init_ray, stops_when_stalled

    init_ray(cfg)
    ds = ray.data.from_items(
        [{"path": p, "skip": sorted(skip)} for p, skip in es.shards], override_num_blocks=len(es.shards)
    )
    ds = decode_tasks(
        ds,
        read_views,
        cfg,
        fn_kwargs=dict(
            store=store,
            meta_json=es.meta.model_dump_json(),
            crop=es.crop,
            spatial_crops=es.spatial_crops,
            views=es.clip_indices,
        ),
    )
    ds = ds.map_batches(
        ScoreViews,
        batch_size=cfg.train.batch_size * es.spatial_crops,
        batch_format="numpy",
        **scoring_actors(cfg),
        fn_constructor_kwargs=dict(
            model=[ray.put(pack_model(net))],
            use_gpu=cfg.infer.use_gpu,
            threads=max(1, math.ceil(cfg.infer.cpus_per_worker)),
            mixed_precision=cfg.infer.mixed_precision,
        ),
    )
    states = []
    with stops_when_stalled(cfg, "evaluate's view readers and scoring actors", EvaluateError):
        for row in ds.iter_rows():
            state = json.loads(row["state"])
            state["videos"]["score_sum"] = np.asarray(state["videos"]["score_sum"], np.float64).reshape(
                len(state["videos"]["video_ids"]), -1
            )
            states.append(state)
    return EvalTotals.merged(states).videos.results(len(es.classes), es.classes)


EVAL_COLUMNS = ("fast", "slow_index", "label", "clip_index", "spatial_index")


def read_views(batch: dict, store: Storage, meta_json: str, crop: int, spatial_crops: int, views: list[int]) -> dict:
    """Ray Data task: one eval shard's chosen views, decoded and cropped as `score` reads them."""
    meta = ShardMeta.model_validate_json(meta_json)
    parts = [
        b
        for i in range(len(batch["path"]))
        for b in iter_clips(
            [(str(batch["path"][i]), set(batch["skip"][i]))],
            mode="eval",
            batch_size=64,
            crop=crop,
            meta=meta,
            filesystem=store.fs,
            spatial_crops=spatial_crops,
            views=views,
        )
    ]
    if not parts:
        return {"video_id": np.zeros(0, object), **{k: np.zeros(0, np.int64) for k in EVAL_COLUMNS}}
    out = {k: np.concatenate([b[k].numpy() for b in parts]) for k in EVAL_COLUMNS}
    out["video_id"] = np.array([v for b in parts for v in b["video_id"]], object)
    return out


class ScoreViews:
    """Ray Data actor: a batch of eval views in, its EvalTotals out (as JSON: exact floats, no pickle)."""

    def __init__(self, model: list, use_gpu: bool, threads: int, mixed_precision: bool):
        from .infer import unpack_model

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.fmt = memory_format(self.device.type)
        self.net = unpack_model(model, threads)[0].to(self.device, memory_format=self.fmt)
        self.mixed_precision = mixed_precision

    def __call__(self, batch: dict) -> dict:
        if not len(batch["label"]):
            return {"state": []}
        with warnings.catch_warnings():  # Ray's batches are read-only views; the model only reads them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            views = {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in EVAL_COLUMNS}
        views["video_id"] = [str(v) for v in batch["video_id"]]
        totals = score_views(self.net, [views], device=self.device, fmt=self.fmt, mixed_precision=self.mixed_precision)
        state = totals.state_dict()
        state["videos"]["score_sum"] = state["videos"]["score_sum"].ravel().tolist()
        return {"state": [json.dumps(state)]}


def evaluation_id(model_uri: str, es: EvalSet) -> str:
    return hashlib.sha256(f"{model_uri}\n{es.identity}".encode()).hexdigest()[:16]


def evaluate(
    cfg: PipelineConfig,
    model_uri: str | None = None,
    log=print,
    es: EvalSet | None = None,
    model: LoadedModel | None = None,
) -> dict:
    """Evaluate a model (`model`, already loaded, or the one at `model_uri`) on the config's eval set (or
    `es`); returns the figures and where the artifacts went."""
    started = time.time()
    store = storage_of(cfg)
    model = model or load_model(cfg, store, model_uri)  # first: a wrong model URI costs no preprocessing
    es = es or eval_set(cfg, store, log)
    if model.class_names != es.classes:
        raise EvaluateError(
            f"{model.uri}: trained on {len(model.class_names)} classes {model.class_names[:8]}, the "
            f"eval set has {len(es.classes)}: {es.classes[:8]}; evaluate it with the config it was "
            "trained with"
        )
    views = len(es.clip_indices) * es.spatial_crops
    log(
        f"evaluate {model.uri}: {len(es.shards)} shard(s) of {cfg.data.val_split}, {len(es.clip_indices)} temporal x "
        f"{es.spatial_crops} spatial views per video"
    )
    res = score_on_ray(cfg, model.net, es, store)
    eval_id = evaluation_id(model.uri, es)
    folder = store.uri("evaluations", eval_id)
    result = {
        "model_uri": model.uri,
        "train_run": model.train_run,
        "eval_set": es.identity,
        "split": cfg.data.val_split,
        "top1": res["top1"],
        "top5": res["top5"],
        "mean_class_accuracy": res["mean_class_accuracy"],
        "num_videos": res["num_videos"],
        "views_per_video": views,
        "per_class": res["per_class"],
        "confusion": res["confusion"],
        "artifacts": folder,
        "wall_s": round(time.time() - started, 1),
    }
    if res["views_per_video"]["min"] != views:
        log(
            f"  warning: some videos have {res['views_per_video']['min']} views, not {views} (short videos or "
            "missing clips)"
        )
    _write_artifacts(store, ("evaluations", eval_id), result, es.classes)
    if model.train_run:
        _log_to_train_run(cfg, store, model.train_run, result, ("evaluations", eval_id))
    # Last: its presence marks the evaluation done (see `recorded`).
    store.write_bytes(f"evaluations/{eval_id}/result.json", json.dumps(result, indent=1).encode())
    log(
        f"evaluate: top-1 {result['top1']:.3f}, top-5 {result['top5']:.3f}, mean class accuracy "
        f"{result['mean_class_accuracy']:.3f} on {result['num_videos']} videos; {folder}"
    )
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
