"""Save SlowFast weights, and load them from this project, pytorchvideo or PySlowFast checkpoints.

The format is recognised from the key names; every key is renamed to ours by a mapping generated
from our own module structure (pathway, stage, block, a/b/c/shortcut, lateral), then loaded strictly.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import STAGE_BLOCKS, STAGE_NAMES
from .slowfast import SlowFast

FORMAT = "slowfast-pipeline"
VERSION = 1
FORMATS = (FORMAT, "pytorchvideo", "pyslowfast")

# Batch-norm step counters: present or absent depending on the writer, and never used by eval
# or by training with a fixed momentum, so neither side is required to have them.
_NBT = "num_batches_tracked"
# Wrappers that prefix every key: DDP / DataParallel ("module."), Lightning and PySlowFast
# variants ("model."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# Config fields that do not change any tensor shape, so a mismatch would load silently.
_SHAPELESS_FIELDS = ("T", "tau", "alpha", "lateral", "fusion", "fast_input")
# How many keys of each kind an error lists before it summarises the rest.
_LIST_LIMIT = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded into the given model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` found: the format, and what was stored beside the weights."""

    format: str  # one of FORMATS
    pathways: int  # 2 for SlowFast, 1 for a single-pathway (Slow-only / Fast-only) network
    extra: dict = field(default_factory=dict)  # e.g. epoch, optimizer state, the saved config


# --- our module structure, as layer descriptors ----------------------------------------------

@dataclass(frozen=True)
class _Layer:
    """One conv / batch-norm / linear module of our network, located in the paper's terms."""

    module: str  # our module path, e.g. "slow.res4.22.a.bn"
    kind: str  # "conv", "bn" or "fc"
    role: str  # "stem", "block", "lateral" or "head"
    stage: int = 0  # index into STAGE_NAMES: 0 stem, 1 res2 ... 4 res5
    pathway: int = 0  # 0 slow (or the only pathway), 1 fast: the reference implementations' order
    block: int = 0
    part: str = ""  # a, b, c or shortcut


def _layers(model: SlowFast) -> Iterator[_Layer]:
    pathways = [name for name in ("slow", "fast") if getattr(model, name) is not None]
    for p, name in enumerate(pathways):
        pathway = getattr(model, name)
        for kind in ("conv", "bn"):
            yield _Layer(f"{name}.stem.{kind}", kind, "stem", 0, p)
        for s, stage in enumerate(STAGE_NAMES[1:], start=1):
            for j, block in enumerate(pathway.stage(stage)):
                for part in ("a", "b", "c", "shortcut"):
                    if getattr(block, part) is None:
                        continue
                    for kind in ("conv", "bn"):
                        yield _Layer(f"{name}.{stage}.{j}.{part}.{kind}", kind, "block", s, p, j, part)
    for s, stage in enumerate(STAGE_NAMES):
        # Only the time-strided conv lateral has weights; the other two are reshapes.
        if stage in model.lateral and list(model.lateral[stage].parameters()):
            for kind in ("conv", "bn"):
                yield _Layer(f"lateral.{stage}.{kind}", kind, "lateral", s)
    yield _Layer("head.fc", "fc", "head")


# --- the foreign naming schemes ---------------------------------------------------------------

def _own_name(layer: _Layer, two_pathway: bool) -> str:
    return layer.module


def _pytorchvideo_name(layer: _Layer, two_pathway: bool) -> str:
    # pytorchvideo Net.blocks: 0 stem, 1..4 res2..res5, then (two pathways) PoolConcatPathway, head.
    # Two pathways wrap each stage in MultiPathWayWithFuse: multipathway_blocks.<p> and the lateral
    # as multipathway_fusion (FuseFastToSlow) of the same block.
    if layer.role == "head":
        return f"blocks.{6 if two_pathway else 5}.proj"
    if layer.role == "lateral":
        return f"blocks.{layer.stage}.multipathway_fusion." + ("norm" if layer.kind == "bn" else "conv_fast_to_slow")
    base = f"blocks.{layer.stage}." + (f"multipathway_blocks.{layer.pathway}." if two_pathway else "")
    norm = layer.kind == "bn"
    if layer.role == "stem":
        return base + ("norm" if norm else "conv")
    base += f"res_blocks.{layer.block}."
    if layer.part == "shortcut":
        return base + ("branch1_norm" if norm else "branch1_conv")
    return base + f"branch2.{'norm' if norm else 'conv'}_{layer.part}"


def _pyslowfast_name(layer: _Layer, two_pathway: bool) -> str:
    # PySlowFast (slowfast/models/video_model_builder.py): stages s1 (stem) .. s5, laterals
    # s1_fuse .. s4_fuse (conv_f2s, bn), ResBlock branch1 = projection shortcut, branch2 = a/b/c.
    if layer.role == "head":
        return "head.projection"
    stage = f"s{layer.stage + 1}"
    suffix = "_bn" if layer.kind == "bn" else ""
    if layer.role == "lateral":
        return f"{stage}_fuse." + ("bn" if layer.kind == "bn" else "conv_f2s")
    if layer.role == "stem":
        return f"{stage}.pathway{layer.pathway}_stem." + ("bn" if layer.kind == "bn" else "conv")
    block = f"{stage}.pathway{layer.pathway}_res{layer.block}."
    if layer.part == "shortcut":
        return block + "branch1" + suffix
    return block + f"branch2.{layer.part}" + suffix


@dataclass(frozen=True)
class _Format:
    name: str
    title: str
    example: str  # one key, for the unrecognised-format message
    layer_name: Callable[[_Layer, bool], str]
    block_key: re.Pattern  # groups: stage (res2..res5 as in the format), block index
    first_stage: int  # what block_key's stage group reads for res2
    detect: Callable[[list[str]], bool]
    two_pathway: Callable[[list[str]], bool]
    aliases: tuple[tuple[str, str], ...] = ()  # (regex, replacement): older names of the same tensors


_OWN = _Format(
    FORMAT, "this project's own (save_checkpoint)", "slow.res2.0.a.conv.weight", _own_name,
    re.compile(r"^(?:slow|fast)\.res(\d)\.(\d+)\."), 2,
    detect=lambda keys: any(k.startswith(("slow.", "fast.", "lateral.", "head.fc.")) for k in keys),
    two_pathway=lambda keys: any(k.startswith("slow.") for k in keys) and any(k.startswith("fast.") for k in keys),
)
_PYTORCHVIDEO = _Format(
    "pytorchvideo", "pytorchvideo (create_slowfast / create_resnet, hub slowfast_r50, slow_r50 ...)",
    "blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight", _pytorchvideo_name,
    re.compile(r"^blocks\.(\d)\.(?:multipathway_blocks\.0\.)?res_blocks\.(\d+)\."), 1,
    detect=lambda keys: any(k.startswith("blocks.") for k in keys),
    two_pathway=lambda keys: any(".multipathway_blocks.1." in k for k in keys),
)
_PYSLOWFAST = _Format(
    "pyslowfast", "PySlowFast .pyth (facebookresearch/SlowFast)", "s1.pathway0_stem.conv.weight",
    _pyslowfast_name, re.compile(r"^s(\d)\.pathway0_res(\d+)\."), 2,
    detect=lambda keys: any(re.match(r"^s[1-5](_fuse)?\.", k) for k in keys),
    two_pathway=lambda keys: any(".pathway1_" in k for k in keys),
    # An early stem_helper.py named the stems s<p>_stem instead of pathway<p>_stem.
    aliases=((r"^s1\.s(\d)_stem\.", r"s1.pathway\1_stem."),),
)
_FORMATS = {f.name: f for f in (_OWN, _PYTORCHVIDEO, _PYSLOWFAST)}


def _key_map(model: SlowFast, fmt: _Format) -> dict[str, str]:
    """Our state-dict key -> the format's key, for every entry of the model's state dict."""
    two_pathway = model.cfg.arch == "slowfast"
    mapping = {}
    for layer in _layers(model):
        foreign = fmt.layer_name(layer, two_pathway)
        for tensor_name in model.get_submodule(layer.module).state_dict():
            mapping[f"{layer.module}.{tensor_name}"] = f"{foreign}.{tensor_name}"
    uncovered = set(model.state_dict()) - set(mapping)
    if uncovered:
        # The network grew a module that _layers does not know: fix _layers, not the checkpoint.
        raise RuntimeError(f"checkpoint key mapping does not cover {sorted(uncovered)}")
    return mapping


def export_state_dict(model: nn.Module, format: str) -> dict[str, torch.Tensor]:
    """The model's state dict under another format's key names (the reverse of the import).

    `format` is "pytorchvideo" or "pyslowfast"; the result loads into pytorchvideo's
    create_slowfast / create_resnet model of the same shape, or into PySlowFast's SlowFast / ResNet.
    """
    model = _unwrap(model)
    if format not in _FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    mapping = _key_map(model, _FORMATS[format])
    return {mapping[key]: value for key, value in model.state_dict().items()}


# --- reading ---------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> SlowFast:
    # DDP / DataParallel keep the network in .module, torch.compile in ._orig_mod.
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
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint path or dict, got {type(source).__name__}")
    path = Path(source)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    except FileNotFoundError:
        raise  # the path is wrong, not the checkpoint
    except Exception as err:
        # weights_only refuses arbitrary pickled objects; a Caffe2 .pkl or a checkpoint holding
        # custom classes ends here. Loading those runs their code, so only the caller may decide.
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}: {err}). "
            "If you trust the file, load it with torch.load(path, weights_only=False) and pass the dict"
        ) from err


def _split(obj: Mapping) -> tuple[dict, dict]:
    """The state dict, and the other top-level entries (epoch, optimizer state, config...)."""
    for container in ("model_state", "state_dict"):
        if isinstance(obj.get(container), Mapping):
            return dict(obj[container]), {k: v for k, v in obj.items() if k != container}
    return dict(obj), {}


def _strip_wrapper_prefixes(state: dict) -> dict:
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _detect(state: dict, meta: dict, origin: str) -> _Format:
    keys = list(state)
    if "format" in meta:
        if meta["format"] != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(
                f"{origin}: format {meta['format']!r} version {meta.get('version')!r}; this version reads "
                f"{FORMAT!r} version {VERSION}")
        return _OWN
    # PySlowFast first: its keys never start with "blocks.", and a pytorchvideo key never starts
    # with "s<digit>." or with our pathway names.
    for fmt in (_PYSLOWFAST, _PYTORCHVIDEO, _OWN):
        if fmt.detect(keys):
            return fmt
    hint = " (a Caffe2 .pkl: convert it with PySlowFast first)" if "blobs" in meta or "blobs" in state else ""
    shown = ", ".join(keys[:5]) or "no keys"
    supported = "; ".join(f"{f.title}, keys like {f.example}" for f in _FORMATS.values())
    raise CheckpointError(f"{origin}: unrecognised checkpoint format{hint} (first keys: {shown}). "
                          f"Supported formats: {supported}")


# --- loading ---------------------------------------------------------------------------------

def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        lines.append(f"    ... and {len(items) - _LIST_LIMIT} more")
    return lines


def _stage_blocks(keys, fmt: _Format) -> tuple[int, ...]:
    """Blocks per stage res2..res5 in a checkpoint, read from its key names."""
    counts = [0, 0, 0, 0]
    for key in keys:
        m = fmt.block_key.match(key)
        if m and 0 <= int(m.group(1)) - fmt.first_stage < 4:
            stage = int(m.group(1)) - fmt.first_stage
            counts[stage] = max(counts[stage], int(m.group(2)) + 1)
    return tuple(counts)


def _shape_hint(ours: str, theirs: tuple, model_shape: tuple) -> str:
    if ours == "head.fc.weight":
        return f" — build the model with num_classes={theirs[0]}"
    if ours.startswith("lateral.") and ours.endswith(".conv.weight") and theirs[2:] != model_shape[2:]:
        return f" — build the model with fusion_kernel={theirs[2]}"
    return ""


def _match(state: dict, key_map: dict[str, str], expected: dict, fmt: _Format):
    """Our-named tensors that fit, and every key that does not: missing, unexpected, mis-shaped."""
    to_ours = {theirs: ours for ours, theirs in key_map.items()}
    converted, unexpected, mis_shaped, bad = {}, [], [], set()
    for key, value in state.items():
        ours = to_ours.get(key)
        if ours is None:
            if not key.endswith(_NBT):
                unexpected.append(key)
            continue
        where = "" if fmt is _OWN else f" [checkpoint key {key}]"
        if not isinstance(value, torch.Tensor):
            bad.add(ours)
            mis_shaped.append(f"{ours}: checkpoint holds a {type(value).__name__}, not a tensor{where}")
        elif value.shape != expected[ours].shape:
            bad.add(ours)
            theirs, mine = tuple(value.shape), tuple(expected[ours].shape)
            mis_shaped.append(f"{ours}: checkpoint {theirs} vs model {mine}{_shape_hint(ours, theirs, mine)}{where}")
        else:
            converted[ours] = value
    missing = [key if fmt is _OWN else f"{key} (as {key_map[key]})" for key in expected
               if key not in converted and key not in bad and not key.endswith(_NBT)]
    return converted, missing, unexpected, mis_shaped


def load_checkpoint(model: nn.Module, source) -> LoadedCheckpoint:
    """Load weights into `model` from a path or a loaded dict, in any supported format, strictly.

    Formats: this project's (`save_checkpoint`, or a bare state dict), pytorchvideo state dicts
    (two-pathway create_slowfast or single-pathway create_resnet, e.g. hub slow_r50 for arch="slow"),
    PySlowFast .pyth checkpoints. Raises CheckpointError listing every missing, unexpected or
    mis-shaped key; the model is left untouched then.
    """
    net = _unwrap(model)
    obj, origin = _read(source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{origin}: expected a dict of tensors, got {type(obj).__name__}")
    state, meta = _split(obj)
    state = _strip_wrapper_prefixes(state)
    fmt = _detect(state, meta, origin)
    for pattern, replacement in fmt.aliases:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    pathways = 2 if fmt.two_pathway(list(state)) else 1
    model_pathways = 2 if net.cfg.arch == "slowfast" else 1
    if fmt is not _OWN and pathways != model_pathways:
        want = "a two-pathway arch='slowfast'" if pathways == 2 else "a single-pathway arch='slow'"
        raise CheckpointError(
            f"{origin}: {fmt.name} checkpoint has {pathways} pathway(s), the model (arch={net.cfg.arch!r}) has "
            f"{model_pathways}; build {want} model (e.g. preset "
            f"{'slowfast_8x8_r50' if pathways == 2 else 'slow_8x8_r50'})")

    expected = net.state_dict()
    converted, missing, unexpected, mis_shaped = _match(state, _key_map(net, fmt), expected, fmt)
    if missing or unexpected or mis_shaped:
        lines = [f"{origin}: {fmt.name} checkpoint does not fit the model "
                 f"(arch={net.cfg.arch}, depth={net.cfg.depth}, num_classes={net.cfg.num_classes}):"]
        found = _stage_blocks(state, fmt)
        if any(found) and found != net.cfg.stage_blocks:
            depth = next((d for d, blocks in STAGE_BLOCKS.items() if blocks == found), None)
            fix = f"build the model with depth={depth}" if depth else "no known depth has these blocks"
            lines.append(f"  the checkpoint has {found} blocks in res2..res5, the model "
                         f"{net.cfg.stage_blocks} (depth {net.cfg.depth}): {fix}")
        lines += _listing("missing from the checkpoint", missing)
        lines += _listing("unexpected in the checkpoint", unexpected)
        lines += _listing("shape mismatch", mis_shaped)
        raise CheckpointError("\n".join(lines))

    # Keep the model's own step counters where the checkpoint has none.
    for key, value in expected.items():
        converted.setdefault(key, value)
    net.load_state_dict(converted, strict=True)

    if fmt is _OWN and isinstance(meta.get("config"), Mapping):
        saved, current = meta["config"], net.cfg.model_dump()
        differ = [f"{k}: checkpoint {saved[k]!r} vs model {current[k]!r}"
                  for k in _SHAPELESS_FIELDS if k in saved and not _same(saved[k], current[k])]
        if differ:
            warnings.warn(f"{origin}: loaded weights trained with a different config ({'; '.join(differ)}); "
                          "shapes match, but the network computes something else", stacklevel=2)
    extra = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return LoadedCheckpoint(format=fmt.name, pathways=pathways, extra=extra)


def _same(a, b) -> bool:
    # Tuples come back from torch.load as lists or tuples depending on the writer.
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


# --- saving ----------------------------------------------------------------------------------

def save_checkpoint(model: nn.Module, path, **extra) -> Path:
    """Write this project's checkpoint atomically: a temporary file in the same folder, then a rename.

    `extra` entries (epoch, optimizer state, metrics...) are stored beside the weights and come
    back in `load_checkpoint(...).extra`; they must be weights-only loadable (tensors, numbers,
    strings, lists, dicts).
    """
    net = _unwrap(model)
    reserved = {"format", "version", "config", "model_state"} & set(extra)
    if reserved:
        raise ValueError(f"save_checkpoint: {sorted(reserved)} are reserved names; pick others for extra entries")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": net.cfg.model_dump(),
               "model_state": net.state_dict(), **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
