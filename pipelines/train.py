"""Train: the driver of a Ray Train run (TorchTrainer, DDP) on the committed shards.

`train` makes sure the shards exist, checks the config against the cluster, opens the MLflow run and
starts the trainer; the workers run `train_loop.train_func` on the stream `train_input` builds.
Checkpoints go to storage_root/checkpoints/<run-name>/; running again with the same run name resumes
after the last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from slowfast.model import CheckpointError, SlowFast, check_checkpoint, load_checkpoint
from slowfast.shards import manifest
from slowfast.shards.schema import ShardMeta, read_meta
from slowfast.video.sampling import choose_views

from . import tracking
from .checkpoints import SCORE, ModelNotFound, as_uri, finished_result, ranked, read_checkpoint, storage_fs
from .config import PipelineConfig
from .data import run_preprocess, storage_of
from .errors import PipelineError
from .storage import Storage
from .train_input import data_config, data_context, train_dataset
from .train_loop import LoopConfig, train_func


class TrainError(PipelineError, RuntimeError):
    """A training run that cannot start or finish: says what is wrong and which key or step to change."""


@dataclass
class TrainData:
    """The committed shards a run trains and validates on: (shard path, video ids to skip) per split."""

    classes: list[str]
    train_meta: ShardMeta
    train_shards: list[tuple[str, set[str]]]
    val_shards: list[tuple[str, set[str]]]
    train_clips: int
    val_videos: int

    def identity(self) -> str:
        """A digest of exactly which clips are read: new or re-decoded videos make a new run."""
        listing = {
            "classes": self.classes,
            "train": [(p, sorted(s)) for p, s in self.train_shards],
            "val": [(p, sorted(s)) for p, s in self.val_shards],
        }
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


# --- the driver ---------------------------------------------------------------------------------------


def train(
    cfg: PipelineConfig,
    *,
    run_name: str | None = None,
    log=print,
    preprocessed: dict | None = None,
    init_weights: tuple[dict, list[str] | None] | None = None,
) -> dict:
    """Preprocess if needed, then train with Ray Train; returns a summary of the run.

    run_name: None = `<name>-<digest of model, train, the shard listing and the initial weights>`, so
    that re-running the same command (after the driver died, say) resumes the same run instead of
    starting over. preprocessed: run_preprocess's result when the caller has just run it.
    train.init_from "champion" starts a new run from the registered champion's weights; init_weights:
    check_init_from's result when the caller has already read train.init_from's checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_runtime import init_ray, stalled, train_logging, waiting_for

    started = time.time()
    check_config(cfg)
    store = storage_of(cfg)
    data = prepare_data(cfg, store, log, preprocessed)
    t = cfg.train
    low, high = t.workers_range
    global_batch = t.batch_size * high  # the largest the run may reach
    steps_per_epoch = data.train_clips // global_batch
    if steps_per_epoch < 1:
        raise TrainError(
            f"train split: {data.train_clips} clips, fewer than one global batch of {global_batch} "
            f"(train.batch_size {t.batch_size} x train.num_workers {high}); lower them or "
            "add videos / preprocess.clips_per_video"
        )
    run_name = run_name or default_run_name(cfg, data)
    tracking_uri = tracking.tracking_uri(cfg)
    run_dir = store.uri("checkpoints", run_name)
    done = finished_result(store, run_name, t.epochs)
    if done is not None:
        # Nothing to train: say what the run produced without starting any worker.
        log(f"train {run_name}: all {t.epochs} epochs are checkpointed in {run_dir}; nothing to do")
        return _summary(
            cfg, store, run_name, done, tracking.open_run(cfg, run_name, reopen=False, log=log), started, log
        )
    init_ray(cfg)
    check_resources(cfg)
    init = initial_weights(cfg, data, store, log, init_weights)  # used only if the run has no checkpoint yet
    mlflow_run_id = tracking.open_run(
        cfg,
        run_name,
        log=log,
        tags={
            "slowfast.manifest_hash": data.identity(),
            "slowfast.git_commit": tracking.git_commit(),
            "slowfast.preset": cfg.model.preset,
            "slowfast.config_hash": cfg.config_hash(),
            **(init or {}).get("tags", {}),
        },
    )
    workers = (
        f"{high} worker(s)"
        if low == high
        else (f"{low} to {high} workers (elastic: batch and LR follow the workers running)")
    )
    log(
        f"train {run_name}: {data.train_clips} clips ({steps_per_epoch} steps of {global_batch}) x {t.epochs} "
        f"epochs on {workers}, val {data.val_videos} videos; checkpoints -> {run_dir}; "
        f"MLflow run {mlflow_run_id} ({tracking_uri})"
    )

    loop = LoopConfig(
        cfg=cfg,
        store=store,
        classes=data.classes,
        val_shards=[(store.path(p), sorted(s)) for p, s in data.val_shards],
        val_views=choose_views(cfg.preprocess.eval_views, cfg.evaluate.temporal_views),
        train_clips=data.train_clips,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        run_name=run_name,
        init_weights=ray.put(init["state"]) if init else None,
    )
    with data_context(use_ray_tqdm=False):  # Ray Data shows plain bars; the workers log one line per epoch
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"loop": loop},
            scaling_config=ray.train.ScalingConfig(
                num_workers=high if low == high else (low, high),
                use_gpu=t.use_gpu,
                resources_per_worker={"CPU": t.cpus_per_worker, **t.resources_per_worker},
                label_selector=dict(cfg.ray.train_nodes) or None,
            ),
            run_config=ray.train.RunConfig(
                logging_config=train_logging(),
                name=run_name,
                storage_path=store.path("checkpoints"),
                storage_filesystem=storage_fs(store),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
                ),
            ),
            datasets={"train": train_dataset(cfg, store, data)},
            dataset_config=data_config(cfg),
        )
    try:
        result = trainer.fit()
        stall = (getattr(result, "return_value", None) or {}).get("stalled")
        if stall:
            raise TrainError(
                f"train {run_name}: stopped after epoch {stall['epoch']} of {t.epochs}. "
                + waiting_for(
                    cfg, "the training input's read and crop tasks", train_cpus=stall["workers"] * t.cpus_per_worker
                )
            )
    except BaseException as exc:
        tracking.close_run(cfg, mlflow_run_id, "FAILED")
        if stalled(exc):  # the timeout reached the driver another way (e.g. through a worker's failure)
            raise TrainError(
                f"train {run_name}: " + waiting_for(cfg, "the training input's read and crop tasks")
            ) from None
        raise
    tracking.log_run_artifacts(cfg, mlflow_run_id)
    tracking.close_run(cfg, mlflow_run_id, "FINISHED")
    return _summary(cfg, store, run_name, result, mlflow_run_id, started, log)


def _summary(
    cfg: PipelineConfig, store: Storage, run_name: str, result, mlflow_run_id: str, started: float, log
) -> dict:
    metrics = dict(result.metrics or {})
    best_first = ranked(result)
    best, best_metrics = best_first[0] if best_first else (None, {})
    ran = getattr(result, "return_value", None) or {}
    summary = {
        "run_name": run_name,
        "epochs_done": int(metrics.get("epoch", 0)),
        "epochs": cfg.train.epochs,
        "resumed_from_epoch": ran.get("resumed_from_epoch", int(metrics.get("epoch", 0))),
        "epochs_run_now": ran.get("epochs_run", 0),
        "metrics": metrics,
        "history": ran.get("history", []),
        "best_checkpoint": as_uri(store, best.path) if best else None,
        f"best_{SCORE}": best_metrics.get(SCORE),
        "checkpoints": [as_uri(store, c.path) for c, _ in best_first],
        "run_dir": store.uri("checkpoints", run_name),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking.tracking_uri(cfg),
        "wall_s": round(time.time() - started, 1),
    }
    log(
        f"train {run_name}: {summary['epochs_done']}/{cfg.train.epochs} epochs done ({summary['epochs_run_now']} "
        f"now); {SCORE} {_fmt(metrics.get(SCORE))}, train_loss {_fmt(metrics.get('train_loss'))}; best checkpoint "
        f"{summary['best_checkpoint']} ({SCORE} {_fmt(summary[f'best_{SCORE}'])}); {summary['wall_s']}s"
    )
    return summary


def check_config(cfg: PipelineConfig) -> None:
    t = cfg.train
    if t.warmup_epochs > t.epochs:
        raise TrainError(
            f"train.warmup_epochs {t.warmup_epochs} is longer than train.epochs {t.epochs}; lower train.warmup_epochs"
        )
    if cfg.ray.data_cpus <= 0:
        raise TrainError(
            "ray.data_cpus is 0: Ray Data would have no CPU to decode clips while training; set it to at least 0.5"
        )


def check_resources(cfg: PipelineConfig) -> None:
    """Train workers plus Ray Data must fit the cluster, or the first batch never comes."""
    import ray

    t = cfg.train
    low = t.workers_range[0]
    cpus = ray.cluster_resources().get("CPU", 0)
    need = low * t.cpus_per_worker + cfg.ray.data_cpus
    if need > cpus + 1e-9 and cfg.ray.address is None:
        raise TrainError(
            f"train needs {need:g} CPUs (train.num_workers {low} x train.cpus_per_worker "
            f"{t.cpus_per_worker:g} + ray.data_cpus {cfg.ray.data_cpus:g}), the local Ray has "
            f"{cpus:g}; lower train.cpus_per_worker (fractions work) or ray.data_cpus"
        )
    if t.use_gpu and ray.cluster_resources().get("GPU", 0) < low and cfg.ray.address is None:
        raise TrainError(
            f"train.use_gpu with {low} workers, the local Ray has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs; set train.use_gpu=false"
        )


def prepare_data(cfg: PipelineConfig, store: Storage, log=print, preprocessed: dict | None = None) -> TrainData:
    """Run preprocess (a no-op when every video is committed; skipped when `preprocessed`, its result, is
    given) and list the readable shards."""
    out = preprocessed or run_preprocess(cfg, splits=[cfg.data.train_split, cfg.data.val_split], log=log)
    # The annotated ids select what is trained on: a video dropped from the annotations keeps its
    # committed clips, but is no longer read.
    plan = out["plan"]
    shards = {}
    for split in (cfg.data.train_split, cfg.data.val_split):
        s = out["splits"][split]
        state = manifest.DatasetState.load(store, manifest.manifest_dir(cfg.data.dataset, split, s["prep_hash"]))
        shards[split] = state.readable(plan.splits[split].annotated_ids)
        if not shards[split]:
            raise TrainError(
                f"{split} split: no processed videos (quarantined: {s['quarantine_reasons'] or 'none'}); "
                f"see {s['quarantine_report']}"
            )
    train_shards = shards[cfg.data.train_split]
    return TrainData(
        classes=list(out["classes"]),
        train_meta=read_meta(store.path(train_shards[0][0]), store.fs),
        train_shards=train_shards,
        val_shards=shards[cfg.data.val_split],
        train_clips=out["splits"][cfg.data.train_split]["clips"],
        val_videos=out["splits"][cfg.data.val_split]["processed"],
    )


def default_run_name(cfg: PipelineConfig, data: TrainData) -> str:
    """Same config and data, same run: a finished run is not trained again, an interrupted one resumes
    (with init_from champion, from the champion as it was when the run started)."""
    digest = hashlib.sha256((cfg.config_hash("model", "train") + data.identity()).encode()).hexdigest()
    return f"{cfg.name}-{digest[:10]}"


def read_init_weights(cfg: PipelineConfig, store: Storage) -> tuple[dict, list[str] | None]:
    """The weights train.init_from names when it is a checkpoint location (not scratch or champion), and
    the class names they carry when known (a registered model of this project)."""
    init = cfg.train.init_from
    try:
        if init.startswith(("models:/", "runs:/")):
            registered = tracking.load_registered(cfg, init)
            return registered.model.state_dict(), registered.class_names
        return read_checkpoint(store, init, key="train.init_from")[0], None
    except (tracking.TrackingError, ModelNotFound) as exc:
        raise TrainError(f"train.init_from: {exc}") from None


def check_init_from(cfg: PipelineConfig, store: Storage, log=print) -> tuple[dict, list[str] | None] | None:
    """Before any work: the checkpoint train.init_from names exists and its backbone fits model: (the head
    is decided once the classes are known). Returns what read_init_weights read, for initial_weights."""
    if cfg.train.init_from in ("scratch", "champion"):
        return None
    source = read_init_weights(cfg, store)
    try:
        report = check_checkpoint(cfg.model.to_slowfast_config(), source[0], head="reinit")
    except CheckpointError as exc:
        raise TrainError(
            f"train.init_from {cfg.train.init_from}: does not fit the model (preset {cfg.model.preset}): {exc}"
        ) from None
    log(f"train.init_from {cfg.train.init_from}: a {report.format} checkpoint whose backbone fits {cfg.model.preset}")
    return source


def initial_weights(
    cfg: PipelineConfig,
    data: TrainData,
    store: Storage,
    log=print,
    weights: tuple[dict, list[str] | None] | None = None,
) -> dict | None:
    """The weights a new run starts from (train.init_from), checked and loaded here in the driver, so that a
    checkpoint that does not fit stops the run before any worker starts. None: from scratch.

    champion: the registered champion, when it was trained on the same classes and architecture (else
    from scratch, and the log says why). A checkpoint location: its backbone must fit exactly; the head is
    re-initialised when the classes differ, keeping the rows of the class names both share. Returns
    {"state": the state dict, "tags": what was loaded from where, for the MLflow run}. weights: what
    check_init_from already read, else read here.
    """
    init = cfg.train.init_from
    if init == "scratch":
        return None
    if init == "champion":
        return _champion_weights(cfg, data, log)
    source, checkpoint_classes = weights if weights is not None else read_init_weights(cfg, store)
    if hasattr(source, "seek"):
        source.seek(0)  # check_init_from has read the file once already
    torch.manual_seed(cfg.train.seed)  # a re-initialised head starts the same on every attempt
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(data.classes)))
    try:
        report = load_checkpoint(
            net, source, head=cfg.train.init_head, class_names=data.classes, checkpoint_classes=checkpoint_classes
        )
    except CheckpointError as exc:
        raise TrainError(f"train.init_from {init}: does not fit the model (preset {cfg.model.preset}): {exc}") from None
    log(f"train: starting from {init}: {report.summary()}")
    if report.unnamed_head:
        log("train: if the checkpoint's classes are not yours in that order, set train.init_head=reinit")
    tags = {
        "init_from": init,
        "init_format": report.format,
        "init_tensors": str(report.loaded),
        "init_reinitialised": ", ".join(report.reinitialised) or "none",
        "init_kept_classes": ", ".join(report.kept_classes) or "none",
    }
    return {
        "state": {k: v.cpu() for k, v in net.state_dict().items()},
        "tags": {f"{tracking.TAG}{k}": v[:5000] for k, v in tags.items()},
    }


def _champion_weights(cfg: PipelineConfig, data: TrainData, log) -> dict | None:
    name = cfg.mlflow.model_name
    mv = tracking.version_by_alias(cfg, name, tracking.CHAMPION)
    if mv is None:
        log(f"train: train.init_from champion, but {name} has no champion yet; training from scratch")
        return None
    champion = tracking.load_registered(cfg, f"models:/{name}/{mv.version}")
    if champion.class_names != data.classes:
        log(
            f"train: the champion ({name} v{mv.version}) knows {len(champion.class_names)} classes, the data has "
            f"{len(data.classes)}; training from scratch"
        )
        return None
    if champion.model.cfg.model_dump(exclude={"num_classes"}) != cfg.model.to_slowfast_config().model_dump(
        exclude={"num_classes"}
    ):
        log(f"train: the champion ({name} v{mv.version}) has another architecture than model:; training from scratch")
        return None
    log(f"train: starting from the champion's weights ({name} v{mv.version})")
    return {
        "state": {k: v.cpu() for k, v in champion.model.state_dict().items()},
        "tags": {f"{tracking.TAG}init_from": f"models:/{name}/{mv.version}"},
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
