"""Everything MLflow, in one module: tracking URIs and clients, experiments and runs, rank 0's per-step
tracker, registry lookups, and the model flavor a registered version is saved in.

The rest of `pipelines` asks this module for MLflow objects and never imports mlflow itself, and
`slowfast/` never sees MLflow: the flavor wraps `slowfast.serving.VideoClassifier`. Artifacts (the
models behind every registry version) go under storage_root unless the tracking server decides.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slowfast.model.checkpoint import CheckpointError, build_from_checkpoint, save_checkpoint
from slowfast.serving import ClipSpec, VideoClassifier, describe
from slowfast.video.clips import TimelineLimitError, TimelineLimits, positive_seconds
from slowfast.video.decode import TOO_MANY_FRAMES, VideoDecodeError

from .errors import PipelineError
from .storage import is_s3

if TYPE_CHECKING:
    from .config import PipelineConfig

CHALLENGER, CHAMPION = "challenger", "champion"
TAG = "slowfast."  # prefix of every tag this project writes
RUN_NAME_TAG = f"{TAG}run_name"
SYSTEM_METRICS_S = 10  # sampling interval of MLflow's system metrics on rank 0
FLAVOR_NAME = "slowfast_video"
INPUT_COLUMN = "video"
# Beside MLmodel in every version logged since the flavor carried it: this project's checkpoint (weights, model
# config, class names), which every loader here reads with torch.load(weights_only=True).
CHECKPOINT = "checkpoint.pt"
ARTIFACTS_DIR = "mlartifacts"  # under storage_root

# Workers log through Ray Train's logging (to the driver's console); a print there comes out twice.
_log = logging.getLogger("pipelines.tracking")


class TrackingError(PipelineError, RuntimeError):
    """An MLflow location or object that cannot be used; says which and what to set."""


# --- where MLflow lives -------------------------------------------------------------------------------


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: workers do not share the driver's cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def tracking_uri(cfg: PipelineConfig) -> str:
    return absolute_tracking_uri(cfg.mlflow.tracking_uri)


def artifact_root(cfg: PipelineConfig) -> str | None:
    """Where new experiments keep their artifacts: storage_root/mlartifacts when the tracking store is a
    local database (which would otherwise use ./mlruns of whatever the working directory is); None for a
    tracking server, whose own artifact root (or proxy) applies."""
    if not cfg.mlflow.tracking_uri.startswith(("sqlite:", "file:", "/", ".")) and "://" in cfg.mlflow.tracking_uri:
        return None
    root = cfg.storage_root.rstrip("/")
    if is_s3(root):
        return f"{root}/{ARTIFACTS_DIR}"
    return Path(root, ARTIFACTS_DIR).resolve().as_uri()


def _s3_environment(cfg: PipelineConfig) -> None:
    """MLflow's S3 artifact store reads its endpoint from the environment; give it the config's."""
    if cfg.s3.endpoint_url and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = cfg.s3.endpoint_url


def client(cfg: PipelineConfig | str):
    """An MlflowClient on the config's tracking URI (or the URI given); the registry follows it."""
    from mlflow.tracking import MlflowClient

    if not isinstance(cfg, str):
        _s3_environment(cfg)
    uri = absolute_tracking_uri(cfg if isinstance(cfg, str) else cfg.mlflow.tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def use_tracking(cfg: PipelineConfig):
    """mlflow's module-level calls (load_model, Model.log) go to the config's server inside; the registry
    follows the tracking URI (unless MLFLOW_REGISTRY_URI says otherwise)."""
    import mlflow

    _s3_environment(cfg)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)


def experiment_id(cfg: PipelineConfig, name: str | None = None, log=print) -> str:
    """The experiment's id, created with its artifacts under storage_root when new. An existing
    experiment keeps the artifact location it was created with (MLflow cannot move it): say so when that
    is not under storage_root, since the registered models live there."""
    c = client(cfg)
    name = name or cfg.mlflow.experiment
    exp = c.get_experiment_by_name(name)
    wanted = artifact_root(cfg)
    if exp is None:
        location = f"{wanted}/{_safe(name)}" if wanted else None
        return c.create_experiment(name, artifact_location=location)
    if wanted and not exp.artifact_location.startswith(wanted):
        log(
            f"MLflow experiment {name!r} keeps its artifacts (the models of its registry versions) at "
            f"{exp.artifact_location}, outside storage_root {cfg.storage_root}; set mlflow.experiment to a new "
            "name to keep new ones under storage_root"
        )
    return exp.experiment_id


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# --- runs ---------------------------------------------------------------------------------------------


def run_by_name(cfg: PipelineConfig, run_name: str) -> str | None:
    """The MLflow run that `pipelines train` opened for this training run name, or None."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    found = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0].info.run_id if found else None


def open_run(
    cfg: PipelineConfig, run_name: str, *, reopen: bool = True, tags: dict[str, str] | None = None, log=print
) -> str:
    """The MLflow run of this training run: the one a previous attempt started (marked running again
    when `reopen`), or a new one; `tags` are set on it either way."""
    c = client(cfg)
    run_id = run_by_name(cfg, run_name)
    if run_id is None:
        run_id = c.create_run(experiment_id(cfg, log=log), run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
    elif reopen:
        c.update_run(run_id, status="RUNNING")
    for k, v in (tags or {}).items():
        c.set_tag(run_id, k, v)
    return run_id


def close_run(cfg: PipelineConfig | str, run_id: str, status: str = "FINISHED") -> None:
    client(cfg).set_terminated(run_id, status)


# Per-epoch metrics drawn in the learning curve (read back from MLflow: complete across resumed attempts).
CURVE_METRICS = ("train_loss", "val_loss", "train_top1", "val_top1", "val_top5")


def log_run_artifacts(cfg: PipelineConfig, run_id: str) -> None:
    """The resolved config and the learning curve, into the run's artifacts."""
    from slowfast.train import learning_curve_png

    c = client(cfg)
    history: dict[int, dict] = {}
    for key in CURVE_METRICS:
        for m in c.get_metric_history(run_id, key):
            history.setdefault(m.step, {"epoch": m.step})[key] = m.value
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        c.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        if history:
            learning_curve_png([history[e] for e in sorted(history)], Path(tmp) / "learning_curve.png")
            c.log_artifact(run_id, str(Path(tmp) / "learning_curve.png"))


def log_files(cfg: PipelineConfig, run_id: str, files: dict[str, bytes], folder: str | None = None) -> None:
    """Small files (name -> bytes) into the run's artifacts, under `folder`."""
    c = client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
            c.log_artifact(run_id, str(Path(tmp) / name), artifact_path=folder)


class RunTracker:
    """Rank 0's MLflow writer (a no-op elsewhere): params once, metrics by step, and system metrics
    (CPU, memory, disk, network) of rank 0's node every SYSTEM_METRICS_S seconds until close()."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.run_id, self.client = run_id, client(tracking_uri) if enabled else None
        self.system = None
        if enabled:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(
                run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=True, tracking_uri=tracking_uri
            )
            self.system.start()

    def close(self) -> None:
        if self.system is not None:
            self.system.finish()
            # MLflow's monitor drops the samples of its last, unfinished interval (all of them in a run
            # shorter than SYSTEM_METRICS_S): they are published here as one more step.
            try:
                last = self.system.aggregate_metrics()
                if last:
                    self.system.publish_metrics(last)
                    self.system.mlflow_logger.flush()
            except Exception as exc:  # close() runs in the worker's `finally`: never hide why it ended
                _log.warning(f"MLflow run {self.run_id}: the last system metrics were not logged ({exc})")
            self.system = None
        if self.client is not None:
            import mlflow

            mlflow.flush_async_logging()

    def logged(self, key: str, step: int) -> bool:
        """Whether the run has a value of metric `key` at `step` (False on ranks that do not log)."""
        return self.client is not None and any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

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
            _log.warning(
                f"MLflow run {self.run_id} keeps the params it was started with; now different: {'; '.join(changed)}"
            )
        items = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def tags(self, tags: dict[str, str]) -> None:
        if self.client is not None:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

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
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))
            ],
            synchronous=wait,
        )


# --- the registry -------------------------------------------------------------------------------------


def version_by_alias(cfg: PipelineConfig, name: str, alias: str):
    """The model version an alias points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(cfg).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def model_versions(cfg: PipelineConfig, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client(cfg).search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def model_version(cfg: PipelineConfig, name: str, version: str | int | None):
    """`version` of `name`, or the challenger when None; a clear error when missing."""
    from mlflow.exceptions import MlflowException

    what = f"models:/{name}@{CHALLENGER}" if version is None else f"models:/{name}/{version}"
    try:
        c = client(cfg)
        return (
            c.get_model_version_by_alias(name, CHALLENGER)
            if version is None
            else c.get_model_version(name, str(version))
        )
    except MlflowException as exc:
        raise TrackingError(describe_missing(cfg, what, exc)) from None


def describe_missing(cfg: PipelineConfig, uri: str, exc: Exception) -> str:
    """A clear message for a models:/ URI that does not resolve: what exists instead."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = uri[len("models:/") :].split("@")[0].split("/")[0] if uri.startswith("models:/") else None
    known = [m.name for m in c.search_registered_models(max_results=50)]
    if name and name not in known:
        return (
            f"{uri}: no registered model {name!r} in {tracking_uri(cfg)} (registered: "
            f"{', '.join(known) or 'none'}); run `python -m pipelines run --config ...` to train and register "
            "one, or check mlflow.tracking_uri"
        )
    if name:
        try:
            aliases = sorted(c.get_registered_model(name).aliases)
        except MlflowException:
            aliases = []
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        return (
            f"{uri}: not found in {tracking_uri(cfg)}: model {name!r} has versions {versions or 'none'} and "
            f"aliases {aliases or 'none'} ({exc.message if hasattr(exc, 'message') else exc})"
        )
    return f"{uri}: cannot load ({exc})"


def load_registered(cfg: PipelineConfig | None, uri: str, device: str = "cpu") -> VideoClassifier:
    """A VideoClassifier from models:/NAME@ALIAS, models:/NAME/N or runs:/... on the config's tracking URI
    (without a config: MLflow's own, i.e. MLFLOW_TRACKING_URI); a clear error when it does not resolve."""
    import mlflow
    from mlflow.exceptions import MlflowException

    where = use_tracking(cfg) if cfg is not None else contextlib.nullcontext()
    with where:
        try:
            return load_classifier(uri, device)
        except MlflowException as exc:
            if cfg is not None:
                raise TrackingError(describe_missing(cfg, uri, exc)) from None
            raise TrackingError(
                f"{uri}: not found in {mlflow.get_tracking_uri()} ({exc.message}); pass --config "
                "(its mlflow.tracking_uri) or set MLFLOW_TRACKING_URI"
            ) from None


def log_export(cfg: PipelineConfig | None, uri: str, path: Path) -> str:
    """Log an exported file under export/ of the run that logged the registered version `uri`
    (models:/NAME/N or models:/NAME@ALIAS); returns the artifact's URI."""
    from mlflow.tracking import MlflowClient

    name, _, ref = uri.removeprefix("models:/").partition("@")
    name, _, number = name.partition("/") if not ref else (name, "", "")
    where = use_tracking(cfg) if cfg is not None else contextlib.nullcontext()
    with where:
        c = MlflowClient()
        version = c.get_model_version_by_alias(name, ref) if ref else c.get_model_version(name, number)
        c.log_artifact(version.run_id, str(path), artifact_path="export")
        return f"{c.get_run(version.run_id).info.artifact_uri.rstrip('/')}/export/{Path(path).name}"


def log_model(
    cfg: PipelineConfig,
    run_id: str,
    *,
    net: torch.nn.Module,
    class_names: Sequence[str],
    spec: ClipSpec,
    metadata: dict,
) -> str:
    """Log the network as this project's flavor in `run_id`, registered under mlflow.model_name; returns
    the new version."""
    import mlflow
    from mlflow.models import Model

    with use_tracking(cfg):
        # MLflow 3 files a logged model under the active experiment, not its run's: without this, experiment
        # 0 ("Default"), whose artifacts are ./mlruns of whatever the working directory is.
        mlflow.set_experiment(experiment_id=client(cfg).get_run(run_id).info.experiment_id)
        info = Model.log(
            None,
            flavor=sys.modules[__name__],
            name="model",
            run_id=run_id,
            registered_model_name=cfg.mlflow.model_name,
            pytorch_model=net,
            class_names=class_names,
            spec=spec,
            input_example=example_video(),
            pip_requirements=_requirements(),
            metadata=metadata,
        )
    return str(info.registered_model_version)


def git_commit() -> str:
    """The source checkout's commit (with -dirty), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def example_video() -> bytes:
    """A one-second synthetic clip, encoded: the logged model's input example (works anywhere)."""
    from slowfast.video.synth import encode_video, render, sample_video

    with tempfile.TemporaryDirectory() as tmp:
        path = encode_video(Path(tmp) / "example.mp4", render(sample_video(0, 0, 0, width=96, height=72, seconds=1.2)))
        return path.read_bytes()


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{p}=={version(p)}"
        for p in ("torch", "av", "numpy", "pydantic", "pandas", "mlflow", "PyYAML", "pyarrow", "simplejpeg")
    ]


# --- the model flavor ---------------------------------------------------------------------------------
# A registered version is a PyTorch model (`mlflow.pytorch.load_model` unpickles the SlowFast nn.Module from
# data/model.pth) whose pyfunc scores videos, plus CHECKPOINT: the same weights as this project's checkpoint.
# This module never unpickles: load_classifier and the pyfunc (_load_pyfunc) build the network from CHECKPOINT,
# read weights-only. It ships the `slowfast` and `pipelines` packages (code_paths), so it loads where this
# project is not installed.


def save_model(
    path: str,
    mlflow_model,
    *,
    pytorch_model: torch.nn.Module,
    class_names: Sequence[str],
    spec: ClipSpec,
    input_example: bytes,
    metadata: dict | None = None,
    pip_requirements: Sequence[str] | None = None,
    **kwargs,
) -> None:
    """Save as the PyTorch flavor (pickled module, so any batch size loads), with the python_function
    flavor pointing at this module: pyfunc input is a `video` column of video bytes (paths by opt-in). The
    weights also go to CHECKPOINT (this project's checkpoint: no pickled code), which is what this project
    loads.

    Called by `mlflow.models.Model.log(flavor=pipelines.tracking, ...)`, see log_model.
    """
    import mlflow.pyfunc
    import mlflow.pytorch

    import slowfast

    here = Path(__file__).resolve().parent
    code = [str(Path(slowfast.__file__).resolve().parent), str(here)]
    meta = {**(metadata or {}), "class_names": list(class_names), "clip_spec": asdict(spec)}
    # Pickle, not pt2: an exported graph fixes the batch size, and prediction batches views. MLflow warns
    # about pickle on every save; the warning is for models from strangers, this one is our own.
    quiet = logging.getLogger("mlflow.pytorch")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        mlflow.pytorch.save_model(
            pytorch_model.cpu().eval(),
            path,
            mlflow_model=mlflow_model,
            serialization_format="pickle",
            signature=signature(),
            metadata=meta,
            input_example=[input_example],
            code_paths=code,
            pip_requirements=list(pip_requirements) if pip_requirements else None,
            **kwargs,
        )
    finally:
        quiet.level = level
    save_checkpoint(pytorch_model, os.path.join(path, CHECKPOINT), class_names=list(class_names))
    pyfunc_flavor = mlflow_model.flavors["python_function"]
    pyfunc_flavor["loader_module"] = __name__
    # MLflow accepts a load-time model_config key only when the saved model declares it.
    pyfunc_flavor.setdefault(mlflow.pyfunc.MODEL_CONFIG, {})["allow_paths"] = False
    pyfunc_flavor[mlflow.pyfunc.MODEL_CONFIG].update(dict.fromkeys(RequestLimits.KEYS))  # None: the default
    mlflow_model.flavors[FLAVOR_NAME] = {
        "class_names": len(class_names),
        "input": INPUT_COLUMN,
        "checkpoint": CHECKPOINT,
    }
    mlflow_model.save(os.path.join(path, "MLmodel"))


def signature():
    """pyfunc: `video` (the file's bytes, base64 over JSON) -> top-k `labels` and `scores` per video, or with
    params timeline=true its `windows` and `segments` (see PyFuncVideoClassifier.predict)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    windows = Object(
        [
            Property("start_s", "double"),
            Property("end_s", "double"),
            Property("labels", Array("string")),
            Property("scores", Array("double")),
        ]
    )
    segments = Object(
        [
            Property("start_s", "double"),
            Property("end_s", "double"),
            Property("label", "string"),
            Property("score", "double"),
        ]
    )
    # The input column is unnamed so that a plain list of videos passes schema enforcement too. The output
    # columns other than `video` depend on the mode, hence optional.
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType())]),
        outputs=Schema(
            [
                ColSpec("string", "video"),
                ColSpec(Array("string"), "labels", required=False),
                ColSpec(Array("double"), "scores", required=False),
                ColSpec(Array(windows), "windows", required=False),
                ColSpec(Array(segments), "segments", required=False),
                ColSpec("string", "clamped", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("top_k", "long", 5),
                ParamSpec("timeline", "boolean", False),
                ParamSpec("window_s", "double", 0.0),
                ParamSpec("stride_s", "double", 0.0),
            ]
        ),
    )


# What one video of a pyfunc request may be, unless the model is loaded with other limits (RequestLimits).
# 64 MiB: it passes the 100 MiB body limit of the nginx in front of MLflow's serving image (build-docker) once
# base64 adds its third, and a request holds it about four times over (body, parsed string, bytes, the decoder's
# buffer); ~4 minutes of 1080p H.264 at 2 Mbit/s. 600 s: a timeline of default windows (one clip, 1 to 4 s)
# decodes every frame, 150 to 560 windows of ten minutes; longer videos are a batch job (`pipelines infer`).
MAX_VIDEO_BYTES = 64 * 2**20
MAX_VIDEO_S = 600.0
# The duration a header declares bounds nothing (a 58 KiB file can declare 1 s and hold 1,000 4K frames, each
# decoded to reach the next): frames decoded per video are counted too. 36,000: ten minutes at 60 fps, ~2.5 CPU
# minutes of 4K H.264. And a request holds at most MAX_VIDEOS videos: one request, bounded work.
MAX_VIDEO_FRAMES = 36_000
MAX_VIDEOS = 16


@dataclass(frozen=True)
class RequestLimits:
    """How big one video of a pyfunc request may be, and its timeline (`TimelineLimits`: windows, clips). Set
    when the model is loaded, by the model_config keys of the same names (KEYS), never by a request."""

    max_video_bytes: int = MAX_VIDEO_BYTES
    max_video_s: float = MAX_VIDEO_S
    max_frames: int = MAX_VIDEO_FRAMES
    max_videos: int = MAX_VIDEOS
    timeline: TimelineLimits = field(default_factory=TimelineLimits)

    KEYS = ("max_video_bytes", "max_video_s", "max_frames", "max_videos", "max_windows", "max_clips")

    @classmethod
    def from_model_config(cls, config: dict | None) -> RequestLimits:
        """The limits a model_config sets; a key absent or None keeps its default."""
        given = {k: v for k, v in (config or {}).items() if k in cls.KEYS and v is not None}
        for key, value in given.items():
            whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            fine = (
                positive_seconds(value)
                if key == "max_video_s"
                else (whole and not isinstance(value, bool) and value >= 1)
            )
            if not fine:
                kind = "a number of seconds > 0" if key == "max_video_s" else "a whole number >= 1"
                raise ValueError(f"model_config {key} must be {kind}, got {value!r}")
        counts = {k: int(v) for k, v in given.items() if k != "max_video_s"}
        timeline = TimelineLimits(**{k: counts[k] for k in ("max_windows", "max_clips") if k in counts})
        return cls(
            max_video_bytes=counts.get("max_video_bytes", MAX_VIDEO_BYTES),
            max_video_s=float(given.get("max_video_s", MAX_VIDEO_S)),
            max_frames=counts.get("max_frames", MAX_VIDEO_FRAMES),
            max_videos=counts.get("max_videos", MAX_VIDEOS),
            timeline=timeline,
        )


def _over_limit(index: int, name: str, problem: str, key: str):
    """The 400 for a video over one of the RequestLimits: what, and the model_config key that raises it."""
    return _invalid(
        f"video {index} ({name}): {problem}; the limit is the model_config key {key!r}, set when the "
        f"model is loaded (mlflow.pyfunc.load_model(uri, model_config={{{key!r}: ...}}); for `mlflow "
        f"models serve`, MLFLOW_PYFUNC_INFERENCE_CONFIG='{{\"{key}\": ...}}' in the server's environment)"
    )


class PyFuncVideoClassifier:
    """What mlflow.pyfunc.load_model returns the predict of: base64 video bytes (or raw bytes) in, a DataFrame
    out. File paths only with allow_paths, which is a load-time model_config: `mlflow models serve` sets it
    from the server's own environment (SERVING_MODEL_CONFIG), never from a request, so a REST client cannot
    make the server open its files. The `limits` on each video (size, duration, timeline) are load-time
    model_config keys too, checked before any frame is decoded."""

    def __init__(self, classifier: VideoClassifier, allow_paths: bool = False, limits: RequestLimits | None = None):
        self.classifier = classifier
        self.allow_paths = allow_paths
        self.limits = limits or RequestLimits()
        classifier.max_frames = self.limits.max_frames

    def predict(self, model_input, params: dict | None = None):
        """One row per video. params: top_k (default 5); timeline (default false); window_s, stride_s (seconds,
        timeline only; 0 or absent: one clip, and the window).

        Default: columns video, labels, scores (the top_k classes over the video's test views).
        timeline=true: columns video, windows, segments, holding the lists `VideoClassifier.timeline` returns
        (windows: start_s, end_s, labels, scores; segments: start_s, end_s, label, score). They stay lists of
        dicts, not JSON strings: MLflow's scoring server writes a DataFrame as records with json.dumps, so over
        REST they arrive as JSON arrays of objects, the shape `predict --timeline --json` writes, and a client
        parses once; JSON strings would arrive as JSON inside JSON, to be parsed twice."""
        import pandas as pd

        params = params or {}
        top_k = int(params.get("top_k", 5))
        if top_k < 1:
            raise _invalid(f"params top_k must be 1 or more, got {top_k}")
        timeline = params.get("timeline", False)
        if not isinstance(timeline, bool):
            raise _invalid(f"params timeline must be true or false, got {timeline!r}")
        window_s, stride_s = (self._seconds(params, key) for key in ("window_s", "stride_s"))
        if not timeline and (window_s or stride_s):
            raise _invalid("params window_s and stride_s are for timelines: add timeline=true")
        if isinstance(model_input, (pd.DataFrame, dict)):
            columns = list(model_input.keys())
            column = INPUT_COLUMN if INPUT_COLUMN in columns else columns[0] if len(columns) == 1 else None
            if column is None:
                raise _invalid(f"expected one column of videos (named {INPUT_COLUMN!r}), got columns {columns}")
            values = model_input[column]
            sources = values.tolist() if hasattr(values, "tolist") else list(values)
        elif isinstance(model_input, (str, bytes, os.PathLike)):
            sources = [model_input]
        else:
            sources = list(model_input)
        if len(sources) > self.limits.max_videos:
            raise _invalid(
                f"{len(sources)} videos in one request > max_videos {self.limits.max_videos}: send them in "
                "several requests, or raise the model_config key 'max_videos' when the model is loaded"
            )
        rows = []
        for i, value in enumerate(sources):
            source = _as_source(value, i, self.allow_paths, self.limits.max_video_bytes)
            name = describe(source, i)
            try:
                self._check_duration(source, name, i)
                if timeline:
                    rows.append(
                        self.classifier.timeline(
                            source, name, window_s=window_s, stride_s=stride_s, top_k=top_k, limits=self.limits.timeline
                        )
                    )
                else:
                    rows += self.classifier.predict([source], top_k=top_k, names=[name])
            except VideoDecodeError as exc:
                if exc.reason == TOO_MANY_FRAMES:  # the budget of this server, not a fault of the video
                    raise _over_limit(
                        i, name, f"more than max_frames {self.limits.max_frames:,} frames to decode", "max_frames"
                    ) from None
                # A client's bad upload is a 400 naming the video, not a 500 with the server's traceback.
                raise _invalid(f"video {i} ({name}): {exc}") from None
            except TimelineLimitError as exc:
                raise _over_limit(i, name, exc.problem, exc.key) from None
        # Every row has every column ("clamped" only where a window was longer than its video): None, not NaN.
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return pd.DataFrame([{k: row.get(k) for k in columns} for row in rows], columns=columns)

    def _check_duration(self, source, name: str, index: int) -> None:
        """Refuse a video longer than max_video_s from its header, before any frame is decoded for scoring."""
        with self.classifier.spec.open(source, name) as reader:
            duration = reader.info.duration_sec
        if duration > self.limits.max_video_s:
            raise _over_limit(
                index,
                name,
                f"the video lasts {duration:,.1f} s > max_video_s {self.limits.max_video_s:g} s",
                "max_video_s",
            )

    @staticmethod
    def _seconds(params: dict, key: str) -> float | None:
        """A timeline length param: None (the default) for 0 or absent, else a positive number of seconds."""
        value = params.get(key) or None
        if value is not None and not positive_seconds(value):
            raise _invalid(f"params {key} must be a number of seconds > 0 (or 0 for the default), got {value!r}")
        return value


def _invalid(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _as_source(value, index: int, allow_paths: bool, max_bytes: int = MAX_VIDEO_BYTES):
    """A pyfunc cell -> bytes, or a path when allow_paths (JSON serving sends bytes base64-encoded, as str).
    Without allow_paths a string is never looked up on disk: it is base64 or it is refused. A video over
    ``max_bytes`` is refused by its size, before base64 is decoded."""

    def check(size: int) -> None:
        if size > max_bytes:
            raise _over_limit(
                index,
                f"<video {index}: {size} bytes>",
                f"{size:,} bytes > max_video_bytes {max_bytes:,}",
                "max_video_bytes",
            )

    if isinstance(value, (bytes, bytearray, memoryview)):
        check(len(value) if not isinstance(value, memoryview) else value.nbytes)
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and allow_paths and os.path.exists(value):
        check(os.path.getsize(value))
        return value
    if isinstance(value, str):
        encoded = "".join(value.split())  # MIME base64 has line breaks
        check(len(encoded) // 4 * 3 - (len(encoded) - len(encoded.rstrip("="))))
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            if allow_paths:
                return value  # a path after all: VideoReader says it is missing
    shown = repr(os.fspath(value) if isinstance(value, os.PathLike) else value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if isinstance(value, (str, os.PathLike)):
        raise _invalid(
            f"video {index} ({shown}): not base64-encoded video bytes. This model takes the video "
            "file's bytes, base64-encoded; file paths are refused and never opened (in local Python, "
            "opt in with mlflow.pyfunc.load_model(uri, model_config={'allow_paths': True}))"
        )
    raise _invalid(f"video {index}: expected base64-encoded video bytes, got {type(value).__name__}")


def load_classifier(model_uri: str, device: str = "cpu") -> VideoClassifier:
    """A VideoClassifier from a logged or registered model (models:/NAME@ALIAS, models:/NAME/N, runs:/...),
    on the current tracking URI (see use_tracking / load_registered). Reads the version's CHECKPOINT
    weights-only; the pickled module beside it is downloaded with the rest of the folder but never loaded."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    return _classifier_from_dir(_download_artifact_from_uri(model_uri), device, model_uri)


def _classifier_from_dir(local: str, device: str, name: str) -> VideoClassifier:
    """The classifier a downloaded model folder holds, from its MLmodel metadata (class names, ClipSpec) and
    CHECKPOINT; `name`: the model as the user gave it, for the errors."""
    from mlflow.models import Model

    mlmodel = Model.load(local)
    meta = mlmodel.metadata or {}
    if "clip_spec" not in meta:
        raise TrackingError(f"{name}: not a model logged by this project (its MLmodel has no clip_spec metadata)")
    checkpoint = mlmodel.flavors.get(FLAVOR_NAME, {}).get("checkpoint")
    if checkpoint is None:
        raise TrackingError(_pickle_only(name))
    data = io.BytesIO(Path(local, checkpoint).read_bytes())
    data.name = f"{name} ({checkpoint})"
    try:
        net, _ = build_from_checkpoint(data)
    except CheckpointError as exc:
        raise TrackingError(str(exc)) from None
    return VideoClassifier(net, meta["class_names"], ClipSpec(**meta["clip_spec"]), device=device)


def _pickle_only(name: str) -> str:
    """Why a version logged before CHECKPOINT existed is refused, and what to use instead."""
    source = _registered_checkpoint(name)
    instead = f"{source} (its tag {TAG}checkpoint)" if source else f"the one its tag {TAG}checkpoint names"
    return (
        f"{name}: logged without {CHECKPOINT} (before registered versions carried one), so its weights are only "
        "a pickled module, which this project never unpickles (a pickle runs whatever code it names); use the "
        f"checkpoint it was registered from instead, {instead}, as train.init_from or evaluate --model-uri, or "
        "register a model trained since"
    )


def _registered_checkpoint(uri: str) -> str | None:
    """The slowfast.checkpoint tag of the registered version a models:/ URI names, or None."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return None
    c = MlflowClient()
    try:
        found = get_model_name_and_version(c, uri)
        return c.get_model_version(*found).tags.get(f"{TAG}checkpoint") if len(found) == 2 else None
    except MlflowException:
        return None


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyFuncVideoClassifier:
    """MLflow's python_function loader: `data_path` is the model folder's data/ subfolder;
    model_config {"device": ...} picks the device (default: cuda when there is one), {"allow_paths": True}
    lets predict open file paths (local use only; see PyFuncVideoClassifier), and RequestLimits.KEYS bound each
    video of a request (max_video_bytes, max_video_s, max_windows, max_clips). The network comes from CHECKPOINT,
    read weights-only, as load_classifier reads it."""
    root = str(Path(data_path).parent)
    device = (model_config or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    allow_paths = (model_config or {}).get("allow_paths", False)
    if not isinstance(allow_paths, bool):
        raise ValueError(f"model_config allow_paths must be true or false, got {allow_paths!r}")
    return PyFuncVideoClassifier(
        _classifier_from_dir(root, device, root),
        allow_paths=allow_paths,
        limits=RequestLimits.from_model_config(model_config),
    )
