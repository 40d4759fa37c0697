"""Train: Ray Train (TorchTrainer, DDP) on the committed shards, streamed and augmented by Ray Data.

The driver (`train`) makes sure the shards exist, builds the train Dataset and starts the trainer;
`train_func` is the loop every worker runs. Checkpoints go to storage_root/checkpoints/<run-name>/,
metrics to MLflow from rank 0. Running again with the same run name resumes after the last checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import posixpath
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from slowfast.model import SlowFast, load_checkpoint, save_checkpoint
from slowfast.shards import manifest
from slowfast.shards.schema import ShardMeta, read_meta
from slowfast.train import (LRSchedule, VideoAggregator, autocast, build_optimizer, clip_inputs, memory_format,
                            scaled_lr, topk_correct, train_step)

from .config import PipelineConfig
from .data import run_preprocess, storage_of
from .errors import PipelineError
from .storage import Storage

# Workers log through Ray Train's logging (to the driver's console); a print there comes out twice.
_worker_log = logging.getLogger("pipelines.train")

CHECKPOINT_FILE = "model.pt"
SYSTEM_METRICS_S = 10  # sampling interval of MLflow's system metrics on rank 0
SCORE = "val_top1"  # the metric that ranks checkpoints (CheckpointConfig keeps the best N)
# Shard files read (and their clips mixed) together by one read task; see read_shards.
SHARDS_PER_READ = 4
# Batches' worth of clips each worker holds to shuffle across read groups (uint8: 32 x 224 x 224 clips
# are 5 MB each); the first batch of an epoch waits until the buffer is full.
SHUFFLE_BATCHES = 4
# Train-mode columns that leave Ray Data: uint8 clips (normalised on the device, 4x fewer bytes) and labels.
TRAIN_COLUMNS = ["slow", "fast", "label"]


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
        listing = {"classes": self.classes,
                   "train": [(p, sorted(s)) for p, s in self.train_shards],
                   "val": [(p, sorted(s)) for p, s in self.val_shards]}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


# --- the driver ---------------------------------------------------------------------------------------


def train(cfg: PipelineConfig, *, run_name: str | None = None, log=print, preprocessed: dict | None = None) -> dict:
    """Preprocess if needed, then train with Ray Train; returns a summary of the run.

    run_name: None = `<name>-<digest of model, train, the shard listing and the initial weights>`, so
    that re-running the same command (after the driver died, say) resumes the same run instead of
    starting over. preprocessed: run_preprocess's result when the caller has just run it.
    train.init_from "champion" starts a new run from the registered champion's weights.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_runtime import init_ray

    started = time.time()
    check_config(cfg)
    store = storage_of(cfg)
    data = prepare_data(cfg, store, log, preprocessed)
    t = cfg.train
    global_batch = t.batch_size * t.num_workers
    steps_per_epoch = data.train_clips // global_batch
    if steps_per_epoch < 1:
        raise TrainError(f"train split: {data.train_clips} clips, fewer than one global batch of {global_batch} "
                         f"(train.batch_size {t.batch_size} x train.num_workers {t.num_workers}); lower them or "
                         "add videos / preprocess.clips_per_video")
    run_name = run_name or default_run_name(cfg, data)
    tracking_uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    run_dir = store.uri("checkpoints", run_name)
    done = finished_result(store, run_name, t.epochs)
    if done is not None:
        # Nothing to train: say what the run produced without starting any worker.
        log(f"train {run_name}: all {t.epochs} epochs are checkpointed in {run_dir}; nothing to do")
        return _summary(cfg, store, run_name, done, mlflow_run(tracking_uri, cfg.mlflow.experiment, run_name,
                                                               reopen=False), tracking_uri, started, log)
    init_ray(cfg)
    check_resources(cfg)
    init = initial_weights(cfg, data, log)  # used only if the run has no checkpoint yet
    from .registry import git_commit

    mlflow_run_id = mlflow_run(tracking_uri, cfg.mlflow.experiment, run_name, tags={
        "slowfast.manifest_hash": data.identity(), "slowfast.git_commit": git_commit(),
        "slowfast.preset": cfg.model.preset, "slowfast.config_hash": cfg.config_hash()})
    log(f"train {run_name}: {data.train_clips} clips ({steps_per_epoch} steps of {global_batch}) x {t.epochs} "
        f"epochs on {t.num_workers} worker(s), val {data.val_videos} videos; checkpoints -> {run_dir}; "
        f"MLflow run {mlflow_run_id} ({tracking_uri})")

    loop_config = {
        "cfg": cfg.model_dump(mode="json"), "store": store, "classes": data.classes,
        "val_shards": [(store.path(p), sorted(s)) for p, s in data.val_shards],
        "steps_per_epoch": steps_per_epoch, "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
        "run_name": run_name, "init_weights": ray.put(init["state"]) if init else None,
    }
    with _data_context(enable_progress_bars=False):  # bars from a remote actor are log noise; epochs are logged
        trainer = TorchTrainer(
            train_func, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                                   resources_per_worker={"CPU": t.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=store.path("checkpoints"), storage_filesystem=_storage_fs(store),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                             checkpoint_score_attribute=SCORE,
                                                             checkpoint_score_order="max")),
            datasets={"train": train_dataset(cfg, store, data)},
            dataset_config=data_config(cfg))
    try:
        result = trainer.fit()
    except BaseException:
        _mlflow_client(tracking_uri).set_terminated(mlflow_run_id, "FAILED")
        raise
    log_run_artifacts(cfg, tracking_uri, mlflow_run_id)
    _mlflow_client(tracking_uri).set_terminated(mlflow_run_id, "FINISHED")
    return _summary(cfg, store, run_name, result, mlflow_run_id, tracking_uri, started, log)


def _storage_fs(store: Storage):
    """On S3, Ray Train takes bucket/prefix plus the filesystem (it carries endpoint and region)."""
    return store.fs if store.is_s3 else None


def finished_result(store: Storage, run_name: str, epochs: int):
    """The run's Result when its checkpoints already cover `epochs` epochs, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(store.path("checkpoints", run_name), storage_filesystem=_storage_fs(store))
    except RuntimeError:  # no such run folder, or no checkpoint snapshot in it yet
        return None
    return result if (result.metrics or {}).get("epoch", 0) >= epochs else None


def best_checkpoint_of_latest_run(store: Storage) -> str | None:
    """The best checkpoint (by val top-1) of the training run that checkpointed last, or None."""
    from ray.train import Result

    files = store.fs.get_file_info(pafs.FileSelector(store.path("checkpoints"), recursive=True, allow_not_found=True))
    newest = max((f for f in files if f.path.endswith("/" + CHECKPOINT_FILE)), key=lambda f: f.mtime_ns or 0,
                 default=None)
    if newest is None:
        return None
    run_dir = posixpath.dirname(posixpath.dirname(newest.path))
    result = Result.from_path(run_dir, storage_filesystem=_storage_fs(store))
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get(SCORE, -math.inf), reverse=True)
    return _uri(store, ranked[0][0].path) if ranked else _uri(store, posixpath.dirname(newest.path))


def _summary(cfg: PipelineConfig, store: Storage, run_name: str, result, mlflow_run_id: str, tracking_uri: str,
             started: float, log) -> dict:
    metrics = dict(result.metrics or {})
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get(SCORE, -math.inf), reverse=True)
    best, best_metrics = ranked[0] if ranked else (None, {})
    ran = getattr(result, "return_value", None) or {}
    summary = {
        "run_name": run_name, "epochs_done": int(metrics.get("epoch", 0)), "epochs": cfg.train.epochs,
        "resumed_from_epoch": ran.get("resumed_from_epoch", int(metrics.get("epoch", 0))),
        "epochs_run_now": ran.get("epochs_run", 0), "metrics": metrics, "history": ran.get("history", []),
        "best_checkpoint": _uri(store, best.path) if best else None, f"best_{SCORE}": best_metrics.get(SCORE),
        "checkpoints": [_uri(store, c.path) for c, _ in ranked], "run_dir": store.uri("checkpoints", run_name),
        "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "wall_s": round(time.time() - started, 1),
    }
    log(f"train {run_name}: {summary['epochs_done']}/{cfg.train.epochs} epochs done ({summary['epochs_run_now']} "
        f"now); {SCORE} {_fmt(metrics.get(SCORE))}, train_loss {_fmt(metrics.get('train_loss'))}; best checkpoint "
        f"{summary['best_checkpoint']} ({SCORE} {_fmt(summary[f'best_{SCORE}'])}); {summary['wall_s']}s")
    return summary


@contextlib.contextmanager
def _data_context(**settings):
    """Ray Data settings for the datasets and trainer built inside; the driver's own are restored after."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def check_config(cfg: PipelineConfig) -> None:
    t = cfg.train
    if t.warmup_epochs > t.epochs:
        raise TrainError(f"train.warmup_epochs {t.warmup_epochs} is longer than train.epochs {t.epochs}; "
                         "lower train.warmup_epochs")
    if cfg.ray.data_cpus <= 0:
        raise TrainError("ray.data_cpus is 0: Ray Data would have no CPU to decode clips while training; "
                         "set it to at least 0.5")


def check_resources(cfg: PipelineConfig) -> None:
    """Train workers plus Ray Data must fit the cluster, or the first batch never comes."""
    import ray

    t = cfg.train
    cpus = ray.cluster_resources().get("CPU", 0)
    need = t.num_workers * t.cpus_per_worker + cfg.ray.data_cpus
    if need > cpus + 1e-9 and cfg.ray.address is None:
        raise TrainError(f"train needs {need:g} CPUs (train.num_workers {t.num_workers} x train.cpus_per_worker "
                         f"{t.cpus_per_worker:g} + ray.data_cpus {cfg.ray.data_cpus:g}), the local Ray has "
                         f"{cpus:g}; lower train.cpus_per_worker (fractions work) or ray.data_cpus")
    if t.use_gpu and ray.cluster_resources().get("GPU", 0) < t.num_workers and cfg.ray.address is None:
        raise TrainError(f"train.use_gpu with {t.num_workers} workers, the local Ray has "
                         f"{ray.cluster_resources().get('GPU', 0):g} GPUs; set train.use_gpu=false")


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
            raise TrainError(f"{split} split: no processed videos (quarantined: {s['quarantine_reasons'] or 'none'}); "
                             f"see {s['quarantine_report']}")
    train_shards = shards[cfg.data.train_split]
    return TrainData(classes=list(out["classes"]), train_meta=read_meta(store.path(train_shards[0][0]), store.fs),
                     train_shards=train_shards, val_shards=shards[cfg.data.val_split],
                     train_clips=out["splits"][cfg.data.train_split]["clips"],
                     val_videos=out["splits"][cfg.data.val_split]["processed"])


def default_run_name(cfg: PipelineConfig, data: TrainData) -> str:
    """Same config and data, same run: a finished run is not trained again, an interrupted one resumes
    (with init_from champion, from the champion as it was when the run started)."""
    digest = hashlib.sha256((cfg.config_hash("model", "train") + data.identity()).encode()).hexdigest()
    return f"{cfg.name}-{digest[:10]}"


def initial_weights(cfg: PipelineConfig, data: TrainData, log=print) -> dict | None:
    """train.init_from "champion": the champion's weights and version, when there is a champion trained
    on the same classes (else None: from scratch, and the log says why)."""
    if cfg.train.init_from != "champion":
        return None
    from mlflow.exceptions import MlflowException

    from .registry import CHAMPION, client, use_tracking

    name = cfg.mlflow.model_name
    try:
        mv = client(cfg).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        log(f"train: train.init_from champion, but {name} has no champion yet; training from scratch")
        return None
    from slowfast.serving import load_classifier

    with use_tracking(cfg):
        champion = load_classifier(f"models:/{name}/{mv.version}")
    if champion.class_names != data.classes:
        log(f"train: the champion ({name} v{mv.version}) knows {len(champion.class_names)} classes, the data has "
            f"{len(data.classes)}; training from scratch")
        return None
    if champion.model.cfg.model_dump(exclude={"num_classes"}) != cfg.model.to_slowfast_config().model_dump(
            exclude={"num_classes"}):
        log(f"train: the champion ({name} v{mv.version}) has another architecture than model:; training from scratch")
        return None
    log(f"train: starting from the champion's weights ({name} v{mv.version})")
    return {"version": int(mv.version), "state": {k: v.cpu() for k, v in champion.model.state_dict().items()}}


def data_cpu_split(data_cpus: float) -> tuple[float, int, float]:
    """(CPUs per shard-read task, transform actors, CPUs per actor) within ray.data_cpus.

    Reads are cheap (JPEG bytes stay bytes): an eighth of the budget, at least one task's worth, so
    that a few run at once on a big node; the JPEG decode and crop run in the actors, on the rest.
    Both fit in data_cpus together, so a read and an actor can always run side by side.
    """
    read_task = min(0.25, data_cpus / 4)
    reads = max(read_task, data_cpus / 8)
    actors = max(1, int(data_cpus - reads + 0.5))
    return read_task, actors, (data_cpus - reads) / actors


def train_dataset(cfg: PipelineConfig, store: Storage, data: TrainData):
    """Shard list -> read a few shards at a time, mixed (read_shards) -> ClipTransform, train mode, uint8
    -> slow, fast, label.

    The shard list goes in with from_items rather than read_parquet: read_parquet's file listing task
    asks for a whole CPU, which a 2-core machine cannot give while the transform actor holds its share.
    """
    import ray
    from ray.data import RandomSeedConfig

    t = cfg.train
    read_cpus, actors, actor_cpus = data_cpu_split(cfg.ray.data_cpus)
    items = [{"path": store.path(p), "skip": json.dumps(sorted(s))} for p, s in data.train_shards]
    # One block per shard file, in a new order on every execution (= every epoch); the clips' crops and
    # flips are fresh per epoch too (ClipTransform with epoch=None), since Ray re-runs the same pipeline.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=t.seed, reseed_after_execution=True))
    ds = ds.map_batches(read_shards, batch_size=SHARDS_PER_READ, batch_format="pyarrow", num_cpus=read_cpus,
                        fn_kwargs={"store": store, "block_rows": t.batch_size})
    # Tasks, not an actor pool: Ray re-runs the pipeline every epoch, and a new actor (a new process that
    # imports torch) took seconds per epoch to start; tasks land on worker processes that are already warm.
    ds = ds.map_batches(train_clips, batch_size=t.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                        fn_kwargs={"meta": data.train_meta, "crop": t.crop_size, "jitter": t.scale_jitter,
                                   "seed": t.seed}, num_cpus=actor_cpus)
    return ds.select_columns(TRAIN_COLUMNS)


def train_clips(batch: pa.Table, meta: ShardMeta, crop: int, jitter: tuple[int, int], seed: int) -> dict:
    """Shard rows -> augmented uint8 clips (ClipTransform in train mode; normalised on the device)."""
    from slowfast.shards.reader import ClipTransform

    return ClipTransform(meta, "train", crop, jitter=jitter, seed=seed, normalize=False, reuse_buffers=False)(batch)


def read_shards(batch: pa.Table, store: Storage, block_rows: int):
    """{"path", "skip"} rows (a few shard files) -> their clips, mixed across the files, in blocks.

    Preprocessing writes videos in annotation order, and annotation files are usually sorted by class,
    so one shard tends to hold one class; reading SHARDS_PER_READ shards together and permuting their
    rows keeps batches from being single-class. Skipped ids ("skip": a JSON list) are clips that a newer
    commit re-decoded into another shard (DatasetState.readable). The order is fresh on every call.
    """
    from slowfast.shards.reader import COLUMNS

    tables = []
    for path, skip in zip(batch.column("path").to_pylist(), batch.column("skip").to_pylist()):
        skip = json.loads(skip)
        with store.fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read(columns=list(COLUMNS))
        if skip:
            table = table.filter(pc.invert(pc.is_in(table.column("video_id"), pa.array(skip))))
        tables.append(table)
    table = pa.concat_tables(tables)
    table = table.take(np.random.default_rng().permutation(table.num_rows))
    for start in range(0, table.num_rows, block_rows):
        yield table.slice(start, block_rows)


def data_config(cfg: PipelineConfig):
    """Ray Data stays within ray.data_cpus (and off the GPUs), leaving the rest to the train workers."""
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources

    limits = ExecutionResources.for_limits(cpu=cfg.ray.data_cpus, gpu=0)
    return ray.train.DataConfig(datasets_to_split=["train"],
                                execution_options={"train": ExecutionOptions(resource_limits=limits)})


# --- MLflow -------------------------------------------------------------------------------------------


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: workers do not share the driver's cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def mlflow_run(tracking_uri: str, experiment: str, run_name: str, reopen: bool = True,
               tags: dict[str, str] | None = None) -> str:
    """The MLflow run of this training run: the one a previous attempt started (marked running again
    when `reopen`), or a new one; `tags` are set on it either way."""
    client = _mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`slowfast.run_name` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        if reopen:
            client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags={"slowfast.run_name": run_name}).info.run_id
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    return run_id


# Per-epoch metrics drawn in the learning curve (read back from MLflow: complete across resumed attempts).
CURVE_METRICS = ("train_loss", "val_loss", "train_top1", "val_top1", "val_top5")


def log_run_artifacts(cfg: PipelineConfig, tracking_uri: str, run_id: str) -> None:
    """The resolved config and the learning curve, into the run's artifacts."""
    from slowfast.train import learning_curve_png

    client = _mlflow_client(tracking_uri)
    history: dict[int, dict] = {}
    for key in CURVE_METRICS:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(m.step, {"epoch": m.step})[key] = m.value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        if history:
            learning_curve_png([history[e] for e in sorted(history)], Path(tmp) / "learning_curve.png")
            client.log_artifact(run_id, str(Path(tmp) / "learning_curve.png"))


class _Tracker:
    """Rank 0's MLflow writer (a no-op elsewhere): params once, metrics by step, and system metrics
    (CPU, memory, disk, network, GPU) of rank 0's node every SYSTEM_METRICS_S seconds until close()."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.run_id, self.client = run_id, _mlflow_client(tracking_uri) if enabled else None
        self.system = None
        if enabled:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=True,
                                               tracking_uri=tracking_uri)
            self.system.start()

    def close(self) -> None:
        if self.system is not None:
            self.system.finish()
            self.system = None
        if self.client is not None:
            import mlflow

            mlflow.flush_async_logging()

    def params(self, params: dict) -> None:
        """Log the params a previous attempt has not; MLflow refuses to change a logged value, so a
        resumed run whose config differs keeps the first values (and says so)."""
        if self.client is None:
            return
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        values = {k: str(v)[:6000] for k, v in sorted(params.items())}
        changed = [f"{k}: {logged[k]} -> {v}" for k, v in values.items() if k in logged and logged[k] != v]
        if changed:
            _worker_log.warning(f"MLflow run {self.run_id} keeps the params it was started with; "
                                f"now different: {'; '.join(changed)}")
        items = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict, step: int, wait: bool = True) -> None:
        """wait=False queues them (MLflow's async logging) instead of holding up the training step;
        wait=True first drains the queue, so an epoch's figures land after its steps'."""
        if self.client is None:
            return
        import mlflow
        from mlflow.entities import Metric

        if wait:
            mlflow.flush_async_logging()
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if v is not None and math.isfinite(float(v))],
                              synchronous=wait)


# --- the worker loop ----------------------------------------------------------------------------------


def train_func(config: dict) -> dict:
    """One Ray Train worker: resume, then per epoch train on its shard of the stream, validate, checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = PipelineConfig.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    fmt = memory_format(device.type)
    classes = config["classes"]
    steps_per_epoch = config["steps_per_epoch"]
    tracker = _Tracker(config["tracking_uri"], config["mlflow_run_id"], enabled=rank == 0)

    if device.type == "cpu":
        torch.set_num_threads(t.threads_per_worker or max(1, math.ceil(t.cpus_per_worker)))
    torch.manual_seed(t.seed + rank)  # different dropout per worker; restored below on resume
    net = SlowFast(cfg.model.to_slowfast_config(num_classes=len(classes)))
    lr = scaled_lr(t.base_lr, t.batch_size * world)
    schedule = LRSchedule(base_lr=lr, warmup_epochs=t.warmup_epochs, total_epochs=t.epochs)
    start_epoch, global_step, extra = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            extra = load_checkpoint(net, Path(folder) / CHECKPOINT_FILE).extra
        start_epoch, global_step = int(extra["epoch"]), int(extra["global_step"])
        # The run continues the schedule it started with, even if the config now says otherwise.
        started_with = extra["schedule"]
        changed = [f"{k} {started_with[k]} -> {getattr(schedule, k)}"
                   for k in ("base_lr", "warmup_epochs", "total_epochs") if started_with[k] != getattr(schedule, k)]
        if changed and rank == 0:
            _worker_log.warning(f"resuming with the checkpoint's LR schedule; the config now differs: "
                                f"{', '.join(changed)} (use a new run name to start over)")
        schedule.load_state_dict(started_with)
    elif config.get("init_weights") is not None:
        net.load_state_dict(ray.get(config["init_weights"]))
    model = ray.train.torch.prepare_model(net.to(memory_format=fmt))
    optimizer = build_optimizer(net, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
    if extra is not None:
        optimizer.load_state_dict(extra["optimizer"])
        set_rng_state(extra["rng"][rank] if rank < len(extra["rng"]) else None)
    if rank == 0:
        tracker.params({**cfg.flatten(), "num_classes": len(classes), "global_batch": t.batch_size * world,
                        "lr": lr, "steps_per_epoch": steps_per_epoch, "run_name": config["run_name"]})
        if start_epoch:
            _worker_log.info(f"resuming after epoch {start_epoch} (step {global_step})")

    shard = ray.train.get_dataset_shard("train")
    try:
        history = _epochs(config, cfg, model, net, optimizer, schedule, shard, tracker, start_epoch, global_step,
                          device, fmt, rank, world)
    finally:
        tracker.close()
    return {"resumed_from_epoch": start_epoch, "epochs_run": t.epochs - start_epoch, "history": history}


def _epochs(config, cfg, model, net, optimizer, schedule, shard, tracker, start_epoch, global_step, device, fmt,
            rank, world) -> list[dict]:
    """Train from start_epoch to the end: per epoch, the steps, validation, a checkpoint and a report."""
    import ray.train

    t, classes, steps_per_epoch = cfg.train, config["classes"], config["steps_per_epoch"]
    history = []
    for epoch in range(start_epoch, t.epochs):
        model.train()
        sums = torch.zeros(5, dtype=torch.float64)  # loss*n, correct, clips, data-wait s, loop s
        epoch_start = wait_start = time.perf_counter()
        # read_shards mixes a few shards; this buffer mixes clips across those groups.
        batches = shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True, device=device,
                                           prefetch_batches=2, local_shuffle_buffer_size=SHUFFLE_BATCHES * t.batch_size)
        for step, batch in enumerate(batches):
            waited = time.perf_counter() - wait_start
            step_lr = schedule.step(optimizer, epoch, step, steps_per_epoch)
            out = train_step(model, optimizer, batch, fmt=fmt, mixed_precision=t.mixed_precision,
                             grad_clip=t.grad_clip, clipped=net)
            n = len(batch["label"])
            loss_value = out.loss.item()  # waits for the device: the step is done
            step_s = time.perf_counter() - wait_start
            sums += torch.tensor([loss_value * n, topk_correct(out.logits.detach(), batch["label"], (1,))[1], n,
                                  waited, step_s], dtype=torch.float64)
            global_step += 1
            tracker.metrics({"loss": loss_value, "lr": step_lr, "clips_per_s": n * world / step_s,
                             "data_wait": waited / step_s, "grad_norm": out.grad_norm}, step=global_step, wait=False)
            wait_start = time.perf_counter()
        sums = _all_sum(sums, world, device)
        epoch_s = time.perf_counter() - epoch_start
        val = evaluate(net, config, cfg, device, fmt, rank, world)
        metrics = {
            "epoch": epoch + 1, "global_step": global_step,
            "train_loss": float(sums[0] / max(sums[2], 1)), "train_top1": float(sums[1] / max(sums[2], 1)),
            "train_clips": int(sums[2]), "epoch_clips_per_s": float(sums[2] / epoch_s),
            "epoch_data_wait": float(sums[3] / max(sums[4], 1e-9)), "epoch_s": epoch_s, **val,
        }
        history.append(metrics)
        tracker.metrics({k: v for k, v in metrics.items() if k not in ("epoch", "global_step")}, step=epoch + 1)
        if rank == 0:
            _worker_log.info(f"epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f}, "
                             f"{SCORE} {metrics[SCORE]:.3f}, {metrics['epoch_clips_per_s']:.1f} clips/s, "
                             f"data wait {metrics['epoch_data_wait']:.0%}, {epoch_s:.1f}s")
        rng = _all_gather(rng_state(), world)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                save_checkpoint(net, Path(folder) / CHECKPOINT_FILE, optimizer=optimizer.state_dict(),
                                schedule=schedule.state_dict(), epoch=epoch + 1, global_step=global_step,
                                rng=rng, metrics=metrics, class_names=classes)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
    return history


def evaluate(net: torch.nn.Module, config: dict, cfg: PipelineConfig, device, fmt, rank: int, world: int) -> dict:
    """Video-level top-1/top-5 over every stored view (centre crop) of the val shards, files split by rank."""
    from slowfast.shards.reader import iter_clips

    store: Storage = config["store"]
    num_classes = len(config["classes"])
    mine = [(p, set(s)) for p, s in config["val_shards"][rank::world]]
    agg = VideoAggregator()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, clip-level correct, clips
    net.eval()
    with torch.no_grad():
        for batch in iter_clips(mine, mode="eval", batch_size=cfg.train.batch_size, crop=cfg.train.crop_size,
                                filesystem=store.fs, spatial_crops=1, normalize=False):
            clips = {k: batch[k].to(device) for k in ("slow", "fast")}
            labels = batch["label"].to(device)
            with autocast(device.type, cfg.train.mixed_precision):
                logits = net(clip_inputs(clips, fmt)).float()
            sums += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                                  topk_correct(logits, labels, (1,))[1], len(labels)], dtype=torch.float64)
            agg.add(batch["video_id"], labels, logits, view_ids=batch["clip_index"])
    net.train()
    sums = _all_sum(sums, world, device)
    total = VideoAggregator.from_state_dicts(_all_gather(agg.state_dict(), world))
    res = total.results(num_classes)
    return {"val_top1": res["top1"], "val_top5": res["top5"], "val_mean_class_accuracy": res["mean_class_accuracy"],
            "val_loss": float(sums[0] / max(sums[2], 1)), "val_clip_top1": float(sums[1] / max(sums[2], 1)),
            "val_videos": res["num_videos"]}


# --- helpers ------------------------------------------------------------------------------------------


def _all_sum(x: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Sum over workers, on the training device (gloo reduces CPU tensors, nccl GPU ones)."""
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        y = x.to(device)
        dist.all_reduce(y)
        return y.cpu()
    return x


def _all_gather(obj, world: int) -> list:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def rng_state() -> dict:
    """Every generator the loop draws from, in weights-only loadable types."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _uri(store: Storage, path: str) -> str:
    """A checkpoint path as Ray Train reports it (bucket/key on S3) -> as the user writes it."""
    if store.is_s3 and not path.startswith("s3://"):
        return f"s3://{path}"
    return path


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
