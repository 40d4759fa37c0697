"""The pipeline's YAML config as typed models: load, apply `--set` overrides, validate, hash.

Every problem is reported at once, by key path, with what is allowed, before any work starts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from slowfast.model import PRESETS, SlowFastConfig
from slowfast.video.decode import DEFAULT_MAX_PIXELS

# base_lr is the learning rate for this many clips per optimizer step (the paper: 8 GPUs x 8
# clips, lr 0.1); the trainer scales it linearly with the real global batch.
LR_REFERENCE_BATCH = 64

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # ends up in storage paths and MLflow names


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, every bad key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class S3Section(Section):
    """Where s3:// paths go. Credentials come from the environment or instance role, never from here."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); None = AWS")
    region: str | None = Field(None, description="bucket region; None = the environment's default")
    max_attempts: int = Field(
        5,
        ge=1,
        description="tries per S3 call (botocore's standard retries: throttling, "
        "5xx, resets, timeouts) and per video body read cut short",
    )


class SynthSection(Section):
    """A synthetic motion dataset, generated when the video folder is empty: a CPU demo with no download."""

    classes: int = Field(6, ge=2, le=64, description="number of motion classes")
    videos_per_class: int = Field(24, ge=2, description="videos per class, train and val together")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="share of each class's videos kept for validation")
    size: int = Field(96, ge=32, description="frame height of the generated videos, pixels (width: 4/3 of it)")
    seconds: float = Field(2.0, gt=0, description="length of each generated video (30 fps)")
    seed: int = Field(0, description="same seed, same videos")


class DataSection(Section):
    """Which videos and labels to use."""

    dataset: str = Field(pattern=_NAME, description="dataset name; shards and manifests are filed under it")
    format: Literal["kinetics_csv", "path_label", "folder"] = Field(
        "kinetics_csv",
        description="annotation format: Kinetics CSV (label,youtube_id,time_start,time_end,split), "
        "lines of '<path relative to video_root> <label>', or folder: no annotation "
        "files, video_root/<label>/... or video_root/<split>/<label>/...",
    )
    video_root: str = Field(description="folder or s3:// prefix holding the videos")
    annotations: dict[str, str] = Field(
        default_factory=dict,
        validate_default=True,
        description="split name -> annotation file (local path or s3://); not with format folder",
    )
    train_split: str = Field("train", description="the split to train on (format folder: its folder name)")
    val_split: str = Field("val", description="the split to evaluate and promote on (format folder: its folder name)")
    val_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="format folder without split folders: the share of videos that a hash of "
        "their path puts in val_split; adding videos never moves existing ones, "
        "raising it only moves videos from train to val",
    )
    synth: SynthSection | None = Field(
        None, description="generate a synthetic dataset into video_root when it is empty; None = never"
    )

    @field_validator("video_root")
    @classmethod
    def _video_root_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; set it to the folder or s3://bucket/prefix that holds the videos")
        return value

    @field_validator("annotations")
    @classmethod
    def _annotations_fit_format(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fmt = info.data.get("format")  # absent when format itself failed; that error is reported at data.format
        if fmt == "folder" and value:
            raise ValueError(
                "format folder takes labels from the folder names and splits from split folders "
                "or data.val_fraction, not from annotation files; remove data.annotations "
                "(--set data.annotations={}) or set data.format to kinetics_csv or path_label"
            )
        if fmt in ("kinetics_csv", "path_label") and not value:
            raise ValueError(
                f"format {fmt} needs an annotation file per split (data.annotations.train, "
                "data.annotations.val); for a folder per class set data.format: folder"
            )
        return value

    @model_validator(mode="after")
    def _splits_annotated(self) -> DataSection:
        for split in (self.train_split, self.val_split):
            if self.annotations and split not in self.annotations:
                raise ValueError(
                    f"split {split!r} has no annotation file; annotations has: {', '.join(self.annotations)}"
                )
        return self


class PreprocessSection(Section):
    """Decode, pre-sample clips and write shards (Ray Data). Changing any of these makes new shards."""

    target_fps: float = Field(30.0, gt=0, description="videos are resampled to this frame rate before sampling")
    short_side: int = Field(256, ge=16, description="frames are resized so their short side is this many pixels")
    clips_per_video: int = Field(2, ge=1, description="training clips pre-sampled per video at random start times")
    eval_views: int = Field(10, ge=1, description="uniformly spaced clips pre-sampled per validation video")
    frame_format: Literal["jpeg", "raw"] = Field("jpeg", description="how frames are stored in the shards")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality when frame_format is jpeg")
    max_frame_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="videos with larger frames are quarantined instead of decoded"
    )
    rows_per_shard: int = Field(128, ge=1, description="clips per Parquet file")
    commit_every: int = Field(
        8, ge=1, description="shards per manifest commit: after a crash, at most this many are decoded again"
    )
    seed: int = Field(0, description="seed of the clip start times; same seed, same shards")
    max_unread: int = Field(
        0,
        ge=0,
        description="videos a storage fault left unread (after retries) that still let the step succeed; "
        "unread videos are never committed, and the next run reads them",
    )


class ModelSection(SlowFastConfig):
    """A named preset (slowfast.model.PRESETS) with any of its fields overridden."""

    preset: str = Field(description=f"architecture preset: {', '.join(PRESETS)}")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # Unknown presets pass through untouched so that the `preset` field validator reports them
        # at model.preset rather than at model.
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in PRESETS:
            return {**PRESETS[data["preset"]].model_dump(), **data}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known presets: {', '.join(PRESETS)}")
        return value

    def to_slowfast_config(self, **overrides) -> SlowFastConfig:
        """The plain network config (e.g. `num_classes=len(classes)` once the dataset is known)."""
        return SlowFastConfig(**{**self.model_dump(exclude={"preset"}), **overrides})

    def overrides(self) -> dict[str, Any]:
        """The fields that differ from the preset."""
        preset = PRESETS[self.preset].model_dump()
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if preset[k] != v}


class TrainSection(Section):
    """Ray Train: workers, optimizer (SGD, linear warm-up then half-period cosine) and checkpoints."""

    epochs: int = Field(196, ge=1, description="training epochs (the paper: 196 from scratch)")
    batch_size: int = Field(8, ge=1, description="clips per worker per step")
    base_lr: float = Field(
        0.1,
        gt=0,
        description=f"learning rate for {LR_REFERENCE_BATCH} clips per step, scaled linearly "
        "with the global batch (batch_size * num_workers)",
    )
    warmup_epochs: float = Field(34.0, ge=0, description="linear warm-up length before the cosine schedule")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; None = no clipping")
    crop_size: int = Field(224, ge=16, description="square training crop, pixels")
    scale_jitter: tuple[int, int] = Field(
        (256, 320), description="short side is resized to a random size in [low, high] before cropping"
    )
    num_workers: int | tuple[int, int] = Field(
        1,
        description="Ray Train workers (DDP processes); [min, max] = elastic: the run starts with as many as the "
        "cluster has room for, goes on with fewer when a node is lost (down to min) and grows back "
        "up to max; the global batch and the learning rate follow the workers actually running",
    )
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each train worker")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="more Ray resources each train worker asks for, e.g. {train_slot: 1} that "
        "only train nodes declare (ray start --resources). Elastic training needs "
        "one on CPU-only train nodes: Ray 2.60 counts the workers that fit from "
        "the resources asked for, not from node labels (GPU workers need none: "
        "only GPU nodes have GPUs)",
    )
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per worker; None = cpus_per_worker rounded up (Ray's default "
        "rounds down, which leaves a 1.5-CPU worker one thread)",
    )
    max_failures: int = Field(3, ge=-1, description="restarts from the last checkpoint after worker loss; -1 = always")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per run, newest first")
    mixed_precision: bool = Field(False, description="bf16 autocast on GPU and on CPUs with avx512_bf16/amx_bf16/bf16")
    seed: int = 0
    init_from: str = Field(
        "scratch",
        description="scratch: random initialisation; champion: the registered champion's weights (same "
        "classes and architecture), e.g. for scheduled retraining; or a checkpoint to "
        "fine-tune: a path, s3://..., models:/NAME/N, models:/NAME@ALIAS or runs:/ID/model, "
        "in this project's, PySlowFast's (.pyth, Caffe2 .pkl), pytorchvideo's or "
        "mmaction2's format (the head is re-initialised when the classes differ)",
    )
    init_head: Literal["auto", "reinit"] = Field(
        "auto",
        description="fine-tuning from a checkpoint: auto = keep its classifier when it has as many classes "
        "and the names (where the checkpoint has them) match, else a new head keeping the rows "
        "of shared class names; reinit = always a new head (e.g. a foreign checkpoint, which "
        "names no classes, with exactly as many classes as your data)",
    )
    freeze_up_to: Literal["none", "stem", "res2", "res3", "res4", "res5"] = Field(
        "none",
        description="fine-tuning: freeze the stem and every stage up to this one (both pathways and their "
        "lateral connections): no gradient, no weight decay, batch norm statistics fixed",
    )
    freeze_bn: bool = Field(
        False,
        description="fine-tuning: every batch norm keeps its statistics and affine parameters (PySlowFast's BN freeze)",
    )
    head_lr_mult: float = Field(
        1.0,
        gt=0,
        description="the classifier head's learning rate relative to the "
        "backbone's (e.g. 10 for a new head on a pretrained backbone)",
    )

    @field_validator("init_from")
    @classmethod
    def _init_location(cls, value: str) -> str:
        if value in ("scratch", "champion") or value.startswith(("s3://", "models:/", "runs:/")):
            return value
        if "://" in value:
            raise ValueError(
                f"{value!r}: expected scratch, champion, a local path, s3://..., models:/NAME/N, "
                "models:/NAME@ALIAS or runs:/ID/model"
            )
        return value

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"{value!r}: a number of workers >= 1, or [min, max] with 1 <= min <= max")
        return value

    @property
    def workers_range(self) -> tuple[int, int]:
        """(min, max) train workers; equal unless train.num_workers is elastic."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])

    @model_validator(mode="after")
    def _crop_fits(self) -> TrainSection:
        low, high = self.scale_jitter
        if low > high:
            raise ValueError(f"scale_jitter must be [low, high] with low <= high, got [{low}, {high}]")
        if self.crop_size > low:
            raise ValueError(
                f"crop_size {self.crop_size} is larger than the smallest jittered "
                f"short side {low}; lower crop_size or raise scale_jitter"
            )
        return self


class EvaluateSection(Section):
    """Multi-view testing: scores averaged over temporal views x spatial crops (the paper: 10 x 3)."""

    temporal_views: int = Field(10, ge=1, description="clips per video, at most preprocess.eval_views")
    spatial_crops: Literal[1, 3] = Field(3, description="1 = centre crop; 3 = left/centre/right (or top/centre/bottom)")


class MlflowSection(Section):
    """Tracking and the model registry."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///..., http://...)")
    experiment: str | None = Field(None, description="experiment name; None = the pipeline name")
    model_name: str | None = Field(None, description="registered model name; None = the pipeline name")
    promote_margin: float = Field(
        0.0,
        ge=0,
        description="a challenger becomes champion only if its val top-1 beats the champion's "
        "by more than this (0.005 = half a point)",
    )


class RaySection(Section):
    """Where Ray runs and how the CPUs are shared."""

    address: str | None = Field(
        None,
        description="None = start a private local Ray (under `ray job submit`: the job's cluster); "
        "'auto' or ray://host:port = join a cluster",
    )
    data_cpus: float = Field(
        1.0, ge=0, description="CPUs left to Ray Data while training, so decoding never waits on train workers"
    )
    train_nodes: dict[str, str] = Field(
        default_factory=dict,
        description="node roles: Ray node labels that train workers (and the scoring actors of "
        "evaluate and infer) require, e.g. {node-role: train}; {} = any node",
    )
    data_nodes: dict[str, str] = Field(
        default_factory=dict,
        description="node roles: Ray node labels that Ray Data's decoding and transforms "
        "(preprocess, the training input, infer's decode tasks) require, e.g. "
        "{node-role: data}; {} = any node",
    )
    data_wait_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a step whose Ray Data work makes no progress this long (no CPU it may use, no "
        "autoscaler to add one) stops with an error saying what it waited for; the same "
        "command resumes once the cluster has room",
    )


class InferSection(Section):
    """Batch inference (`pipelines infer`): CPU tasks decode and cut the views, an actor pool scores them."""

    workers: int | None = Field(
        None,
        ge=1,
        description="scoring actors at most (the pool grows to it while videos wait); None = one per "
        "GPU of the cluster with use_gpu, else one per cpus_per_worker + decode_cpus CPUs",
    )
    use_gpu: bool = Field(False, description="one GPU per scoring actor")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs of a scoring actor (its torch threads, rounded up)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs of a decode task (one video at a time, PyAV 1 thread)")
    batch_videos: int = Field(4, ge=1, description="videos per scoring call (a video in chunks: chunks)")
    chunk_clips: int = Field(
        10,
        ge=1,
        description="clips a decode task cuts and an actor scores at a time, so that memory does not grow "
        "with a timeline's windows: 10 clips at crop 224, 3 crops, 32 Fast frames are 138 MiB "
        "of uint8 views (a decode task holds them about twice: the chunk and its output "
        "block), and the paper's 10-clip test protocol is one chunk, one scoring batch",
    )
    mixed_precision: bool = Field(
        False,
        description="bf16 autocast (GPU, or CPUs with bf16) in the scoring actors "
        "of infer and of evaluate (the evaluate step, promote); "
        "training's per-epoch validation follows train.mixed_precision",
    )
    commit_every_s: float = Field(
        30.0,
        ge=0,
        description="results are committed (visible, never redone) at least this often; 0 = after every batch",
    )
    max_unread: int = Field(
        0,
        ge=0,
        description="videos a storage fault left unread (after retries) that still let infer succeed; "
        "unread videos are never committed, and the next run scores them",
    )


class PipelineConfig(Section):
    """One pipeline: data in, a registered model out."""

    name: str = Field(pattern=_NAME, description="pipeline name: run records, checkpoints and MLflow names use it")
    storage_root: str = Field(
        "./storage", description="where everything the pipeline writes goes: a folder or s3://bucket/prefix"
    )
    shared_filesystem: bool = Field(
        False,
        description="storage_root (and a local data.video_root) is a filesystem every node mounts at the same "
        "path (NFS, EFS, Lustre); without it a cluster of more than one node refuses a local path",
    )
    s3: S3Section = Field(default_factory=S3Section)
    data: DataSection
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    model: ModelSection
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    ray: RaySection = Field(default_factory=RaySection)
    infer: InferSection = Field(default_factory=InferSection)

    @field_validator("storage_root")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        if "://" in value and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
            raise ValueError(f"must be a local folder or s3://bucket/prefix, got {value!r}")
        return value

    @model_validator(mode="after")
    def _across_sections(self) -> PipelineConfig:
        # Errors raised here have no location of their own, so each message starts with its key.
        if self.evaluate.temporal_views > self.preprocess.eval_views:
            raise ValueError(
                f"evaluate.temporal_views: {self.evaluate.temporal_views} views but only "
                f"preprocess.eval_views={self.preprocess.eval_views} are pre-sampled; "
                "lower one or raise the other"
            )
        if self.mlflow.experiment is None:
            self.mlflow.experiment = self.name
        if self.mlflow.model_name is None:
            self.mlflow.model_name = self.name
        return self

    def config_hash(self, *sections: str) -> str:
        """sha256 of the canonical JSON of the resolved config, or of just the named sections."""
        data = self.model_dump(mode="json", include=set(sections) or None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> values (`train.base_lr: 0.1`), e.g. for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The resolved config; `load_config` of this text gives the same config and hash."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, dict):  # an empty mapping (ray.train_nodes {}: any node) is a value of its own
            flat[f"{prefix}{key}"] = "{}"
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read the YAML file, apply `KEY=VALUE` overrides (dotted keys, YAML values), validate."""
    path = Path(path)
    data = _read_yaml(path)
    problems = []
    for override in overrides:
        try:
            _apply_override(data, override)
        except ValueError as exc:
            problems.append(str(exc))
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems += [_describe(err, overrides) for err in exc.errors()]
    if problems:
        raise ConfigError(_report(path, problems))
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice instead of silently keeping the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; pass --config with the path of a pipeline YAML (configs/demo.yaml is an example)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}: YAML syntax error{where}: {exc.problem or exc.context}; "
            "fix the file (indent with spaces, 'key: value')"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it needs at least name, data and model sections")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections "
            f"({', '.join(PipelineConfig.model_fields)}), got a {type(data).__name__}"
        )
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"--set {override!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket): take it as a plain string
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:  # `synth:` with nothing after it, or `synth: null`
            child = node[part] = {}
        if not isinstance(child, dict):
            here = ".".join(parts[: depth + 1])
            raise ValueError(
                f"{here}: is a value ({child!r}), not a section; cannot set {key.strip()!r}  [from --set {override}]"
            )
        node = child
    node[parts[-1]] = value


def _report(path: Path, problems: list[str]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"{path}: invalid config, {count}:\n" + "\n".join(f"  {p}" for p in problems)


def _describe(err: dict[str, Any], overrides) -> str:
    loc = tuple(str(part) for part in err["loc"])
    key = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "extra_forbidden":
        owner = _model_at(PipelineConfig, loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "?"
        msg = f"unknown key; allowed: {allowed}"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] != "value_error" and not isinstance(err.get("input"), dict):
        msg = f"{msg} (got {err['input']!r})"
    line = f"{key}: {msg}" if key else msg
    for override in overrides:
        target, sep, _ = override.partition("=")
        target = target.strip()
        if sep and key and (key == target or key.startswith(target + ".") or target.startswith(key + ".")):
            line += f"  [from --set {override}]"
    return line


def _model_at(model: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, for listing its keys."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if inspect.isclass(tp) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, list, tuple):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if inspect.isclass(tp) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """`X | None` -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp
