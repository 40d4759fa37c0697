"""Save SlowFast weights; load them from this project, pytorchvideo, PySlowFast (.pyth or Caffe2 .pkl)
or mmaction2 checkpoints, strictly or with the classifier re-initialised for other classes.

The format is recognised from the content and every key renamed by `formats`. The backbone must fit
exactly: a checkpoint that does not is refused with every difference listed, and the preset or config
field that would fit it (or why none does).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pydantic
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import caffe2
from .config import PRESETS, STAGE_BLOCKS, STAGE_NAMES, SlowFastConfig
from .formats import (
    BY_NAME,
    CAFFE2,
    FORMAT,
    MMACTION2,
    NBT,
    OWN,
    PATHWAY_NAMES,
    PYSLOWFAST,
    PYTORCHVIDEO,
    Format,
    export,
    key_map,
    stage_blocks,
)
from .slowfast import SlowFast

VERSION = 1
FORMATS = tuple(BY_NAME)
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
# strict: the head must fit like the rest; auto: re-initialise it when the class count or names differ;
# reinit: always re-initialise it (rows of class names both sides share are still kept).
HeadPolicy = Literal["strict", "auto", "reinit"]

# Config fields that do not change any tensor shape, so a mismatch would load silently.
_SHAPELESS_FIELDS = ("T", "tau", "alpha", "lateral", "fusion", "fast_input")
# Wrappers that prefix every key: DDP / DataParallel ("module."), Lightning and PySlowFast
# variants ("model."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# How many keys of each kind an error lists before it summarises the rest.
_LIST_LIMIT = 20
# Why a lateral_norm difference matters, by the checkpoint's value: the two laterals compute different
# functions, and pipeline users set the field in their config's model: section.
_LATERAL_NORM = {
    False: "the checkpoint's lateral connections are bare convolutions (mmaction2's default lateral_norm=False: "
    "no batch norm and no ReLU after the time-strided conv); set model.lateral_norm: false in the pipeline "
    "config (SlowFastConfig(lateral_norm=False)) to build such laterals",
    True: "the checkpoint's lateral connections are conv + batch norm + ReLU (the paper's, PySlowFast's, "
    "pytorchvideo's, mmaction2's lateral_norm=True); set model.lateral_norm: true (the default) in the "
    "pipeline config",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded into the given model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a load did, in named fields a run log or MLflow can record."""

    format: str  # one of FORMATS
    pathways: int  # 2 for SlowFast, 1 for a single-pathway (Slow-only / Fast-only) network
    source: str  # the path, or "checkpoint dict"
    loaded: int  # tensors taken whole from the checkpoint (BN step counters not counted)
    reinitialised: tuple[str, ...] = ()  # our keys left at the model's own initialisation
    kept_classes: tuple[str, ...] = ()  # class names whose classifier row came from the checkpoint
    checkpoint_classes: int = 0  # rows of the checkpoint's classifier
    unnamed_head: bool = False  # its classifier was kept although the checkpoint names no classes
    extra: dict = field(default_factory=dict)  # e.g. epoch, optimizer state, the saved config

    def summary(self) -> str:
        line = f"loaded {self.loaded} tensors from {self.source} ({self.format})"
        if self.reinitialised:
            line += (
                f"; re-initialised {', '.join(self.reinitialised)} (checkpoint: {self.checkpoint_classes} "
                f"classes), kept the rows of {len(self.kept_classes)} shared classes"
            )
            if self.kept_classes:
                line += f": {', '.join(self.kept_classes)}"
        elif self.unnamed_head:
            line += (
                f"; kept its {self.checkpoint_classes}-class classifier: the checkpoint names no classes, so "
                "its rows are taken to be the model's classes in their order"
            )
        return line


# --- reading ---------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> SlowFast:
    """The SlowFast inside DDP / DataParallel (.module) or torch.compile (._orig_mod) wrappers."""
    while not isinstance(model, SlowFast):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a SlowFast model (slowfast.model.build), got {type(model).__name__}")
        model = inner
    return model


def _read(source) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, "checkpoint dict"
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:  # a wrong path raises FileNotFoundError: the path is wrong, not the file
            return _read_file(f, str(source)), str(source)
    if hasattr(source, "read") and hasattr(source, "seek"):
        origin = str(getattr(source, "name", "checkpoint stream"))
        return _read_file(source, origin), origin
    raise TypeError(f"expected a checkpoint path, binary file or dict, got {type(source).__name__}")


def _read_file(f: BinaryIO, origin: str):
    start = f.tell()
    if zipfile.is_zipfile(f):  # torch.save's format since PyTorch 1.6
        f.seek(start)
        return _torch_load(f, origin)
    f.seek(start)
    try:
        first = caffe2.read_pickle(f)
    except caffe2.UnsafePickle as err:
        raise CheckpointError(
            f"{origin}: refused to unpickle {err.global_name}: a Caffe2 .pkl holds only numpy arrays in plain "
            "containers, and building anything else would run code the file names. If you trust the file, "
            "load it with pickle.load(f, encoding='latin1') and pass the dict"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{origin}: neither a torch checkpoint nor a pickle ({type(err).__name__}: {err})"
        ) from err
    if isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER:
        # torch.save's format before PyTorch 1.6 (2019 PySlowFast .pyth files): a magic number, then pickles.
        f.seek(start)
        return _torch_load(f, origin)
    return first


def _torch_load(f: BinaryIO, origin: str):
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:
        # weights_only refuses arbitrary pickled objects; loading those runs their code, so only the
        # caller may decide to.
        raise CheckpointError(
            f"{origin}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: {_reason(err)}). "
            "If you trust the file, load it with torch.load(path, weights_only=False) and pass the dict"
        ) from err


def _reason(err: Exception) -> str:
    """torch's weights-only refusal in one line: the sentence naming what it refused (its advice around it says
    to turn weights_only off, which is the caller's decision), or the whole message on one line."""
    for line in str(err).splitlines():
        # "WeightsUnpickler error: Unsupported global: GLOBAL types.SimpleNamespace was not an allowed global by
        # default. Please use ...", or "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        if "GLOBAL" in line:
            return line.split("WeightsUnpickler error:")[-1].strip().split(". ")[0].rstrip(".")
    return " ".join(str(err).split())


def _split(obj: Mapping) -> tuple[dict, dict]:
    """The state dict, and the other top-level entries (epoch, optimizer state, config...)."""
    if isinstance(obj.get("blobs"), Mapping):
        return caffe2.blobs(obj), {k: v for k, v in obj.items() if k != "blobs"}
    for container in ("model_state", "state_dict"):
        if isinstance(obj.get(container), Mapping):
            return dict(obj[container]), {k: v for k, v in obj.items() if k != container}
    return dict(obj), {}


def _strip_wrapper_prefixes(state: dict) -> dict:
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _detect(state: dict, meta: dict, origin: str) -> Format:
    keys = list(state)
    if "format" in meta:
        if meta["format"] != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(
                f"{origin}: format {meta['format']!r} version {meta.get('version')!r}; this version reads "
                f"{FORMAT!r} version {VERSION}"
            )
        return OWN
    # PySlowFast first: its keys never start with "blocks.", and a pytorchvideo key never starts
    # with "s<digit>." or with our pathway names; mmaction2 and Caffe2 names share no prefix with either.
    for fmt in (PYSLOWFAST, PYTORCHVIDEO, MMACTION2, CAFFE2, OWN):
        if fmt.detect(keys):
            return fmt
    shown = ", ".join(keys[:5]) or "no keys"
    supported = "; ".join(f"{f.title}, keys like {f.example}" for f in BY_NAME.values())
    raise CheckpointError(
        f"{origin}: unrecognised checkpoint format (first keys: {shown}). Supported formats: {supported}"
    )


def _is_array(value) -> bool:
    return isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and value.dtype.kind in "fiub")


# --- matching --------------------------------------------------------------------------------


@dataclass
class _Match:
    """The checkpoint against the model, in our key names."""

    values: dict  # every mapped array, in our layout, whether its shape fits or not
    missing: list[str]  # our keys the checkpoint lacks
    unexpected: list[str]  # the checkpoint's keys that name nothing of ours
    wrong: dict[str, str]  # our key -> what is wrong with the checkpoint's value (shape or type)


def _match(state: dict, mapping: dict[str, str], expected: dict, fmt: Format, cfg: SlowFastConfig) -> _Match:
    to_ours = {theirs: ours for ours, theirs in mapping.items()}
    values, unexpected, wrong = {}, [], {}
    for key, value in state.items():
        ours = to_ours.get(key)
        if ours is None:
            if not key.endswith(NBT):
                unexpected.append(key)
            continue
        where = "" if fmt is OWN else f" [checkpoint key {key}]"
        if not _is_array(value):
            wrong[ours] = f"{ours}: checkpoint holds a {type(value).__name__}, not a tensor{where}"
            continue
        shape = tuple(expected[ours].shape)
        if fmt.to_ours is not None:
            value = fmt.to_ours(ours, value, shape, cfg)
        values[ours] = value
        if tuple(value.shape) != shape:
            wrong[ours] = f"{ours}: checkpoint {tuple(value.shape)} vs model {shape}{where}"
    missing = [key for key in expected if key not in values and key not in wrong and not key.endswith(NBT)]
    return _Match(values, missing, unexpected, wrong)


# --- what a checkpoint that does not fit is, and what would fit it ----------------------------


class _NoInit(TorchFunctionMode):
    """Skips weight initialisation: a skeleton's tensors hold no values, and initialising meta tensors
    imports torch._dynamo (seconds, the first time in a process) for nothing."""

    _INITIALISERS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INITIALISERS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _skeleton(cfg: SlowFastConfig) -> SlowFast:
    """The network's structure and shapes without its memory, to name and measure keys."""
    with torch.device("meta"), _NoInit():
        return SlowFast(cfg)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"    ... and {len(items) - _LIST_LIMIT} more")
    return lines


def _runs(values: list[int]) -> str:
    """[3, 3, 1, 1, 1] -> "3 in blocks 0-1, 1 in blocks 2-4"."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            blocks = f"block {start}" if i - start == 1 else f"blocks {start}-{i - 1}"
            parts.append(f"{values[start]} in {blocks}")
            start = i
    return ", ".join(parts)


def _fields_from_shapes(shapes: dict[str, tuple], arch: str, depth: int, cfg: SlowFastConfig) -> dict:
    """The config fields that the checkpoint's tensor shapes pin down (ours named)."""
    fields: dict = {"arch": arch, "depth": depth}
    slow, fast = shapes.get("slow.stem.conv.weight"), shapes.get("fast.stem.conv.weight")
    if slow:
        fields["width"] = slow[0]
    if fast:
        if slow:
            fields["beta"] = fast[0] / slow[0]
        elif (fast[0] / cfg.beta).is_integer():
            fields["width"] = int(fast[0] / cfg.beta)
        if fast[1] == 1:
            fields["fast_input"] = "grayscale"
        elif cfg.fast_input == "grayscale":
            fields["fast_input"] = "rgb"
    for pathway in PATHWAY_NAMES:
        kernels = [shapes.get(f"{pathway}.stem.conv.weight")] + [
            shapes.get(f"{pathway}.{stage}.0.a.conv.weight") for stage in STAGE_NAMES[1:]
        ]
        if all(kernels):
            fields[f"{pathway}_temporal_kernels"] = tuple(k[2] for k in kernels)
    into_slow = shapes.get("slow.res2.0.a.conv.weight")
    if arch == "slowfast" and slow and fast and into_slow:
        lateral, side = shapes.get("lateral.stem.conv.weight"), into_slow[1] - slow[0]
        if lateral:
            fields.update(
                lateral="time_strided_conv",
                fusion_kernel=lateral[2],
                fusion="sum" if side == 0 else "concat",
                lateral_norm="lateral.stem.bn.weight" in shapes,
            )
            if side and lateral[0] % fast[0] == 0:
                fields["fusion_channel_ratio"] = lateral[0] // fast[0]
        elif side == 0:
            # The other laterals have no conv, so lateral_norm keeps its default: anything else is invalid.
            fields.update(lateral="none", fusion="concat", lateral_norm=True)
        elif side == fast[0]:
            fields.update(lateral="time_strided_sampling", fusion="concat", lateral_norm=True)
        elif side % fast[0] == 0:
            fields.update(lateral="time_to_channel", fusion="concat", alpha=side // fast[0], lateral_norm=True)
    if shapes.get("head.fc.weight"):
        fields["num_classes"] = shapes["head.fc.weight"][0]
    return fields


def _presets_like(fit: SlowFastConfig, fields: dict) -> str:
    """The presets that build `fit`'s shapes, or the nearest one with the overrides it needs."""
    shape_fields = [k for k in fields if k != "num_classes"]
    differing = {
        name: [k for k in shape_fields if not _same(getattr(preset, k), getattr(fit, k))]
        for name, preset in PRESETS.items()
        if (preset.arch, preset.depth) == (fit.arch, fit.depth)
    }
    exact = [name for name, fields_off in differing.items() if not fields_off]
    if exact:
        return " or ".join(f"preset {name}" for name in exact)
    if not differing:
        return "no preset has this arch and depth"
    name = min(differing, key=lambda n: len(differing[n]))
    return f"preset {name} with " + ", ".join(f"{k}={getattr(fit, k)!r}" for k in differing[name])


def _diagnose(state: dict, fmt: Format, cfg: SlowFastConfig, head: HeadPolicy) -> list[str]:
    """Lines that say how the checkpoint's network differs from the model's, and what would fit it."""
    blocks = stage_blocks(state, fmt)
    if not blocks:
        return []
    if len(set(blocks.values())) > 1:
        per_pathway = ", ".join(f"{PATHWAY_NAMES[p]} pathway {b}" for p, b in blocks.items())
        return [
            f"  the checkpoint's blocks in res2..res5 differ by pathway ({per_pathway}); this project builds "
            "both pathways with one depth: no preset or config field fits it"
        ]
    found = next(iter(blocks.values()))
    depth = next((d for d, b in STAGE_BLOCKS.items() if b == found), None)
    if depth is None:
        return [
            f"  the checkpoint has {found} blocks in res2..res5, a depth this project does not build "
            f"(depths {', '.join(f'{d} {b}' for d, b in STAGE_BLOCKS.items())}): no preset or field fits it"
        ]

    two_pathway = fmt.two_pathway(list(state))
    if fmt is OWN:
        arch = "slowfast" if two_pathway else ("fast" if any(k.startswith("fast.") for k in state) else "slow")
    else:
        arch = "slowfast" if two_pathway else ("fast" if cfg.arch == "fast" else "slow")
    # Names depend on the structure only: every lateral conv and BN named, whatever the model's own lateral.
    naming = cfg.model_copy(
        update={"arch": arch, "depth": depth, "lateral": "time_strided_conv", "fusion": "concat", "lateral_norm": True}
    )
    names = key_map(_skeleton(naming), fmt)
    shapes = {ours: tuple(state[theirs].shape) for ours, theirs in names.items() if _is_array(state.get(theirs))}
    fields = _fields_from_shapes(shapes, arch, depth, cfg)
    try:
        fit = SlowFastConfig(**{**cfg.model_dump(), **fields})
    except pydantic.ValidationError as err:
        return [f"  the checkpoint's shapes read as {fields}, which no config accepts: {err.errors()[0]['msg']}"]

    skeleton = _skeleton(fit)
    fit_names, fit_shapes = key_map(skeleton, fmt), skeleton.state_dict()
    residual = [
        ours
        for ours, theirs in fit_names.items()
        if not ours.endswith(NBT)
        and (not _is_array(state.get(theirs)) or tuple(state[theirs].shape) != tuple(fit_shapes[ours].shape))
    ]
    named = set(fit_names.values())
    extra = [k for k in state if k not in named and not k.endswith(NBT)]
    # With a head to re-initialise, another class count is no difference to report.
    changed = {
        k: v for k, v in fields.items() if not _same(getattr(cfg, k), v) and (k != "num_classes" or head == "strict")
    }
    if not residual and not extra:
        if not changed:
            return []
        lines = [
            "  the checkpoint's network has "
            + ", ".join(f"{k}={v!r}" for k, v in changed.items())
            + " where the model has "
            + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in changed)
        ]
        if "lateral_norm" in changed and fit.lateral == "time_strided_conv":
            lines.append("  " + _LATERAL_NORM[fit.lateral_norm])
        fix = "build the model with " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
        if set(changed) - {"num_classes"}:
            fix += f" ({_presets_like(fit, fields)})"
        if "num_classes" in changed and head == "strict":
            fix += "; or keep the model's classes and load with head='auto' to re-initialise the classifier"
        return lines + [f"  to load it: {fix}"]

    for pathway in PATHWAY_NAMES:
        for stage, count in zip(STAGE_NAMES[1:], found, strict=False):
            kernels = [shapes.get(f"{pathway}.{stage}.{j}.a.conv.weight") for j in range(count)]
            if all(kernels) and len({k[2] for k in kernels}) > 1:
                return [
                    f"  {stage} of the {pathway} pathway has temporal kernel {_runs([k[2] for k in kernels])} "
                    "(PySlowFast's NUM_BLOCK_TEMP_KERNEL, as in its R101_50_50 models); this project gives "
                    "every block of a stage the same temporal kernel (slow_temporal_kernels / "
                    "fast_temporal_kernels): no preset or config field fits it; the nearest is "
                    f"{_presets_like(fit, fields)}"
                ]
    if not changed:
        return []  # the model's own architecture, with tensors missing or extra: the listings say which
    shown = [
        f"{k} {tuple(state[fit_names[k]].shape) if _is_array(state.get(fit_names[k])) else 'absent'} "
        f"vs {tuple(fit_shapes[k].shape)}"
        for k in residual[:3]
    ] + extra[:3]
    return [
        f"  the nearest config this project builds ({', '.join(f'{k}={v!r}' for k, v in changed.items())}) "
        f"still differs: {len(residual)} tensors absent or of another shape, {len(extra)} checkpoint keys with "
        f"no place in it (e.g. {'; '.join(shown)}): no preset or config field fits it"
    ]


# --- loading ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A checked checkpoint: what to copy into the model, and the report of it."""

    values: dict  # our key -> the checkpoint's value, for every tensor taken whole
    rows: list[tuple[int, int]]  # (model row, checkpoint row) of the classifier kept from a re-initialised head
    head: dict  # the checkpoint's head values (our keys), when rows are kept
    report: LoadedCheckpoint


def _class_names(names, count: int, what: str, error: type[Exception]) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(str(n) for n in names)
    if len(names) != count:
        raise error(f"{what} has {len(names)} class names for {count} classes")
    return names


def _plan(
    net: SlowFast,
    obj,
    origin: str,
    head: HeadPolicy,
    class_names: Sequence[str] | None,
    checkpoint_classes: Sequence[str] | None,
) -> _Plan:
    """`obj`: the checkpoint as `_read` returns it, `origin` where it came from (for the messages)."""
    if head not in ("strict", "auto", "reinit"):
        raise ValueError(f"head must be 'strict', 'auto' or 'reinit', got {head!r}")
    class_names = _class_names(class_names, net.cfg.num_classes, "class_names (the model's classes)", ValueError)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{origin}: expected a dict of tensors, got {type(obj).__name__}")
    state, meta = _split(obj)
    state = _strip_wrapper_prefixes(state)
    fmt = _detect(state, meta, origin)
    for pattern, replacement in fmt.aliases:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    pathways = 2 if fmt.two_pathway(list(state)) else 1
    model_pathways = 2 if net.cfg.arch == "slowfast" else 1
    if fmt is not OWN and pathways != model_pathways:
        want = "a two-pathway arch='slowfast'" if pathways == 2 else "a single-pathway arch='slow'"
        raise CheckpointError(
            f"{origin}: {fmt.name} checkpoint has {pathways} pathway(s), the model (arch={net.cfg.arch!r}) has "
            f"{model_pathways}; build {want} model (e.g. preset "
            f"{'slowfast_8x8_r50' if pathways == 2 else 'slow_8x8_r50'})"
        )

    expected, mapping = net.state_dict(), key_map(net, fmt)
    m = _match(state, mapping, expected, fmt, net.cfg)
    head_weight = m.values.get("head.fc.weight")
    # Another class count leaves the head's input width alone; anything else wrong with it is the backbone's.
    head_replaceable = (
        head != "strict"
        and head_weight is not None
        and "head.fc.bias" in m.values
        and tuple(head_weight.shape[1:]) == tuple(expected["head.fc.weight"].shape[1:])
    )
    ignored = set(HEAD_KEYS) if head_replaceable else set()
    wrong = [text for key, text in m.wrong.items() if key not in ignored]
    if m.missing or m.unexpected or wrong:
        lines = [
            f"{origin}: {fmt.name} checkpoint does not fit the model "
            f"(arch={net.cfg.arch}, depth={net.cfg.depth}, num_classes={net.cfg.num_classes}):"
        ]
        lines += _diagnose(state, fmt, net.cfg, head)
        lines += _listing(
            "missing from the checkpoint", [k if fmt is OWN else f"{k} (as {mapping[k]})" for k in m.missing]
        )
        lines += _listing("unexpected in the checkpoint", m.unexpected)
        lines += _listing("shape mismatch", wrong)
        raise CheckpointError("\n".join(lines))

    checkpoint_rows = int(head_weight.shape[0])
    theirs = _class_names(
        checkpoint_classes if checkpoint_classes is not None else meta.get("class_names"),
        checkpoint_rows,
        f"{origin} (its classifier)",
        CheckpointError,
    )
    same_head = "head.fc.weight" not in m.wrong and (theirs is None or class_names is None or theirs == class_names)
    values = {k: v for k, v in m.values.items() if k not in HEAD_KEYS}
    rows, reinitialised, kept, unnamed = [], (), (), False
    if head == "strict" or (head == "auto" and same_head):
        values.update({k: m.values[k] for k in HEAD_KEYS})
        kept = class_names if theirs is not None and theirs == class_names else ()
        unnamed = theirs is None and head == "auto"
    else:
        index = {name: j for j, name in reversed(list(enumerate(theirs or ())))}
        rows = [(i, index[name]) for i, name in enumerate(class_names or ()) if name in index]
        kept = tuple(class_names[i] for i, _ in rows)
        reinitialised = HEAD_KEYS if len(rows) < net.cfg.num_classes else ()

    if fmt is OWN and isinstance(meta.get("config"), Mapping):
        saved, current = meta["config"], net.cfg.model_dump()
        differ = [
            f"{k}: checkpoint {saved[k]!r} vs model {current[k]!r}"
            for k in _SHAPELESS_FIELDS
            if k in saved and not _same(saved[k], current[k])
        ]
        if differ:
            warnings.warn(
                f"{origin}: loaded weights trained with a different config ({'; '.join(differ)}); "
                "shapes match, but the network computes something else",
                stacklevel=3,
            )
    extra = {k: v for k, v in meta.items() if k not in ("format", "version")}
    report = LoadedCheckpoint(
        format=fmt.name,
        pathways=pathways,
        source=origin,
        loaded=sum(not k.endswith(NBT) for k in values) + (len(HEAD_KEYS) if rows and not reinitialised else 0),
        reinitialised=reinitialised,
        kept_classes=kept,
        checkpoint_classes=checkpoint_rows,
        unnamed_head=unnamed,
        extra=extra,
    )
    return _Plan(values, rows, {k: m.values[k] for k in HEAD_KEYS} if rows else {}, report)


def load_checkpoint(
    model: nn.Module,
    source,
    *,
    head: HeadPolicy = "strict",
    class_names: Sequence[str] | None = None,
    checkpoint_classes: Sequence[str] | None = None,
) -> LoadedCheckpoint:
    """Load weights into `model` from a path, a binary file or a loaded dict, in any supported format.

    Formats (recognised from the content): this project's (`save_checkpoint`, or a bare state dict),
    pytorchvideo state dicts (create_slowfast, or create_resnet for arch="slow"), PySlowFast .pyth,
    PySlowFast Caffe2 .pkl (read without running pickled code) and mmaction2 .pth recognisers.

    The backbone must fit exactly. `head` decides the classifier: "strict" (the default) loads it like
    the rest; "auto" re-initialises it when the class count differs, or when both the model's
    `class_names` and the checkpoint's differ; "reinit" always does. A re-initialised head keeps the
    checkpoint's row of every class name both sides share; the other rows keep the model's own
    initialisation, so load into a freshly built model. The checkpoint's names come from
    `checkpoint_classes`, else from the checkpoint (this project's checkpoints store class_names;
    foreign ones name none).

    Raises CheckpointError listing every missing, unexpected or mis-shaped key and what would fit; the
    model is left untouched then. Returns what was loaded and re-initialised.
    """
    net = unwrap(model)
    return _apply(net, _plan(net, *_read(source), head, class_names, checkpoint_classes))


def _apply(net: SlowFast, plan: _Plan) -> LoadedCheckpoint:
    state = net.state_dict()
    # Keys not taken from the checkpoint (a re-initialised head, absent step counters) keep the model's.
    new = {key: torch.as_tensor(plan.values[key]) if key in plan.values else value for key, value in state.items()}
    if plan.rows:
        mine, theirs = zip(*plan.rows, strict=True)
        for key in HEAD_KEYS:
            new[key] = state[key].clone()
            new[key][list(mine)] = torch.as_tensor(plan.head[key])[list(theirs)].to(new[key].dtype)
    net.load_state_dict(new, strict=True)
    return plan.report


def build_from_checkpoint(source) -> tuple[SlowFast, LoadedCheckpoint]:
    """The network a checkpoint of this project (`save_checkpoint`) holds: built from the config saved in it,
    its weights loaded strictly. The report's `extra` has what was saved beside them (class_names, epoch...).

    Raises CheckpointError for a file that cannot be read weights-only, or that holds no config (a foreign
    checkpoint, or a bare state dict: build the model and use `load_checkpoint`).
    """
    obj, origin = _read(source)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT or not isinstance(obj.get("config"), Mapping):
        raise CheckpointError(
            f"{origin}: not a checkpoint written by this project (no {FORMAT!r} format and "
            "model config in it): build the model it fits and load it with load_checkpoint"
        )
    try:
        cfg = SlowFastConfig.model_validate(obj["config"])
    except pydantic.ValidationError as err:
        raise CheckpointError(f"{origin}: its model config is invalid: {err.errors()[0]['msg']}") from None
    # Shapes first, on the meta device: a config of a few bytes (num_classes=10**8) must not allocate the network
    # before the weights it holds are found not to fit it.
    _plan(_skeleton(cfg), obj, origin, "strict", None, None)
    net = SlowFast(cfg)
    return net, _apply(net, _plan(net, obj, origin, "strict", None, None))


def check_checkpoint(
    cfg: SlowFastConfig,
    source,
    *,
    head: HeadPolicy = "strict",
    class_names: Sequence[str] | None = None,
    checkpoint_classes: Sequence[str] | None = None,
) -> LoadedCheckpoint:
    """What `load_checkpoint` would do for a model built from `cfg`, without building it or loading anything.

    For a driver that must refuse a checkpoint before starting workers: raises the same CheckpointError,
    returns the same report. The network is built on the meta device (shapes only, no memory).
    """
    return _plan(_skeleton(cfg), *_read(source), head, class_names, checkpoint_classes).report


def _same(a, b) -> bool:
    # Tuples come back from torch.load as lists or tuples depending on the writer.
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


# --- saving ----------------------------------------------------------------------------------


def _write_atomically(path, write: Callable[[BinaryIO], None]) -> Path:
    """A temporary file in the same folder, then a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(model: nn.Module, path, **extra) -> Path:
    """Write this project's checkpoint atomically.

    `extra` entries (epoch, optimizer state, metrics, class_names...) are stored beside the weights and
    come back in `load_checkpoint(...).extra`; they must be weights-only loadable (tensors, numbers,
    strings, lists, dicts). `class_names` lets a later fine-tuning keep the classifier rows of shared classes.
    """
    net = unwrap(model)
    reserved = {"format", "version", "config", "model_state"} & set(extra)
    if reserved:
        raise ValueError(f"save_checkpoint: {sorted(reserved)} are reserved names; pick others for extra entries")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": net.cfg.model_dump(),
        "model_state": net.state_dict(),
        **extra,
    }
    return _write_atomically(path, lambda f: torch.save(payload, f))


def export_state_dict(model: nn.Module, format: str) -> dict:
    """The model's state dict under another format's key names and value layout (the reverse of the import).

    "pytorchvideo" loads into pytorchvideo's create_slowfast / create_resnet model of the same shape,
    "pyslowfast" into PySlowFast's SlowFast / ResNet, "mmaction2" into its Recognizer3D (a SlowFast
    backbone with lateral_norm as the model's), "caffe2" gives PySlowFast's Caffe2 blobs (numpy arrays).
    """
    if format not in BY_NAME or format == FORMAT:
        raise ValueError(f"unknown format {format!r}; export formats: {', '.join(f for f in FORMATS if f != FORMAT)}")
    return export(unwrap(model), BY_NAME[format])


def export_checkpoint(model: nn.Module, path, format: str) -> Path:
    """Write the model's weights as a checkpoint file of `format`, the way its own tools write one.

    PySlowFast and pytorchvideo: {"model_state": ...} (.pyth); mmaction2: {"state_dict": ...} (.pth);
    Caffe2: a pickle of {"blobs": ...} (.pkl). Atomic, like save_checkpoint.
    """
    state = export_state_dict(model, format)
    if format == CAFFE2.name:
        return _write_atomically(path, lambda f: caffe2.write_pickle(f, state))
    container = "state_dict" if format == MMACTION2.name else "model_state"
    return _write_atomically(path, lambda f: torch.save({container: state}, f))
