"""How each published SlowFast implementation names our layers: this project, pytorchvideo, PySlowFast
(.pyth and Caffe2 .pkl) and mmaction2.

Every key map is generated from our own module structure (pathway, stage, block, a/b/c/shortcut,
lateral), so a network of any depth gets every key; `checkpoint.py` does the reading and loading.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import STAGE_NAMES, STAGE_OUT_MULT, SlowFastConfig
from .slowfast import SlowFast

# Batch-norm step counters: present or absent depending on the writer, and never used by eval
# or by training with a fixed momentum, so neither side is required to have them.
NBT = "num_batches_tracked"
PATHWAY_NAMES = ("slow", "fast")  # the reference implementations' pathway order: 0 slow, 1 fast


@dataclass(frozen=True)
class Layer:
    """One conv / batch-norm / linear module of our network, located in the paper's terms."""

    module: str  # our module path, e.g. "slow.res4.22.a.bn"
    kind: str  # "conv", "bn" or "fc"
    role: str  # "stem", "block", "lateral" or "head"
    stage: int = 0  # index into STAGE_NAMES: 0 stem, 1 res2 ... 4 res5
    pathway: int = 0  # 0 slow (or the only pathway), 1 fast
    block: int = 0  # for a lateral: the last block of its stage (Caffe2 names the lateral after it)
    part: str = ""  # a, b, c or shortcut


def layers(model: SlowFast) -> Iterator[Layer]:
    pathways = [name for name in PATHWAY_NAMES if getattr(model, name) is not None]
    for p, name in enumerate(pathways):
        pathway = getattr(model, name)
        for kind in ("conv", "bn"):
            yield Layer(f"{name}.stem.{kind}", kind, "stem", 0, p)
        for s, stage in enumerate(STAGE_NAMES[1:], start=1):
            for j, block in enumerate(pathway.stage(stage)):
                for part in ("a", "b", "c", "shortcut"):
                    if getattr(block, part) is None:
                        continue
                    for kind in ("conv", "bn"):
                        yield Layer(f"{name}.{stage}.{j}.{part}.{kind}", kind, "block", s, p, j, part)
    for s, stage in enumerate(STAGE_NAMES):
        # Only the time-strided conv lateral has weights; the other two are reshapes. Its BN is
        # absent (an Identity) in a lateral_norm=False network.
        if stage in model.lateral and list(model.lateral[stage].parameters()):
            last = len(model.fast.stage(stage)) - 1 if s else 0
            norm = isinstance(model.lateral[stage].bn, nn.BatchNorm3d)
            for kind in ("conv", "bn") if norm else ("conv",):
                yield Layer(f"lateral.{stage}.{kind}", kind, "lateral", s, block=last)
    yield Layer("head.fc", "fc", "head")


# --- the naming schemes: our layer -> the format's module name, or straight to a key ----------


def _own_name(layer: Layer, two_pathway: bool) -> str:
    return layer.module


def _pytorchvideo_name(layer: Layer, two_pathway: bool) -> str:
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


def _pyslowfast_name(layer: Layer, two_pathway: bool) -> str:
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


def _mmaction2_name(layer: Layer, two_pathway: bool) -> str:
    # mmaction2 Recognizer3D: backbone ResNet3dSlowFast (slow_path / fast_path, each a ResNet3dPathway;
    # ResNet3dSlowOnly has no path level), stages layer1..layer4 of Bottleneck3d conv1/conv2/conv3 and
    # downsample, every conv a ConvModule (.conv, .bn); the laterals live in the slow path as
    # conv1_lateral and layer<i>_lateral; the head is SlowFastHead / I3DHead fc_cls.
    if layer.role == "head":
        return "cls_head.fc_cls"
    module = ".bn" if layer.kind == "bn" else ".conv"
    if layer.role == "lateral":
        return "backbone.slow_path." + ("conv1_lateral" if layer.stage == 0 else f"layer{layer.stage}_lateral") + module
    path = "backbone." + (f"{PATHWAY_NAMES[layer.pathway]}_path." if two_pathway else "")
    if layer.role == "stem":
        return path + "conv1" + module
    part = "downsample" if layer.part == "shortcut" else {"a": "conv1", "b": "conv2", "c": "conv3"}[layer.part]
    return path + f"layer{layer.stage}.{layer.block}.{part}" + module


def _dotted(module_name: Callable[[Layer, bool], str]) -> Callable[[Layer, str, bool], str]:
    return lambda layer, tensor, two_pathway: f"{module_name(layer, two_pathway)}.{tensor}"


# Caffe2 blob suffixes of a spatial batch norm (PySlowFast c2_model_loading.get_name_convert_func):
# scale, bias, running mean, running variance ("riv" is loaded as the variance itself).
_CAFFE2_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}


def _caffe2_key(layer: Layer, tensor: str, two_pathway: bool) -> str | None:
    # The Caffe2 SlowFast blobs (PySlowFast's Kinetics/c2 model zoo): the fast pathway's names start
    # with "t_"; a lateral is named after the fast layer it reads (t_pool1 for the stem, the last
    # block's branch2c BN for res2..res4) plus "_subsample"; the classifier is "pred".
    if layer.role == "head":
        return {"weight": "pred_w", "bias": "pred_b"}[tensor]
    bn = layer.kind == "bn"
    if bn and tensor == NBT:
        return None  # Caffe2 keeps no step counter
    fast = "t_" if layer.pathway == 1 else ""
    if layer.role == "stem":
        base = fast + ("res_conv1_bn" if bn else "conv1")
    elif layer.role == "lateral":
        base = (
            "t_pool1_subsample" if layer.stage == 0 else f"t_res{layer.stage + 1}_{layer.block}_branch2c_bn_subsample"
        ) + ("_bn" if bn else "")
    else:
        branch = "branch1" if layer.part == "shortcut" else f"branch2{layer.part}"
        base = f"{fast}res{layer.stage + 1}_{layer.block}_{branch}" + ("_bn" if bn else "")
    return f"{base}_{_CAFFE2_BN[tensor]}" if bn else f"{base}_w"


# --- values that differ beyond their names -----------------------------------------------------


def _head_split(cfg: SlowFastConfig) -> int | None:
    """Columns of the classifier that read the slow pathway; None for a single-pathway network."""
    return cfg.width * STAGE_OUT_MULT[4] if cfg.arch == "slowfast" else None


def _mmaction2_to_ours(key: str, value, shape: tuple, cfg: SlowFastConfig):
    # SlowFastHead concatenates the pooled pathways as (fast, slow); ours (and the other formats) as
    # (slow, fast). Only a head whose columns fit the model is reordered; a wrong one stays wrong.
    split = _head_split(cfg)
    if key != "head.fc.weight" or split is None or tuple(value.shape[1:]) != tuple(shape[1:]):
        return value
    fast = shape[1] - split
    return torch.cat([value[:, fast:], value[:, :fast]], dim=1)


def _mmaction2_from_ours(key: str, value: torch.Tensor, cfg: SlowFastConfig) -> torch.Tensor:
    split = _head_split(cfg)
    if key != "head.fc.weight" or split is None:
        return value
    return torch.cat([value[:, split:], value[:, :split]], dim=1)


def _caffe2_to_ours(key: str, value, shape: tuple, cfg: SlowFastConfig):
    # As PySlowFast's convert_from_caffe2: a blob with fewer dimensions than the parameter gets
    # trailing 1s (a linear layer stored for a 1x1x1 convolution).
    if isinstance(value, np.ndarray) and value.ndim < len(shape):
        return value.reshape(value.shape + (1,) * (len(shape) - value.ndim))
    return value


def _caffe2_from_ours(key: str, value: torch.Tensor, cfg: SlowFastConfig) -> np.ndarray:
    return value.detach().cpu().numpy().copy()


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    example: str  # one key, for the unrecognised-format message
    key: Callable[[Layer, str, bool], str | None]  # (layer, tensor name, two pathways) -> key, None = not stored
    block_key: re.Pattern  # named groups: p (pathway token, may be absent), s (stage), b (block)
    first_stage: int  # what block_key's stage group reads for res2
    pathway_tokens: Mapping[str | None, int]  # block_key's p group -> pathway index
    detect: Callable[[list[str]], bool]
    two_pathway: Callable[[list[str]], bool]
    aliases: tuple[tuple[str, str], ...] = ()  # (regex, replacement): older names of the same tensors
    to_ours: Callable | None = None  # (our key, value, model shape, cfg) -> value as our model reads it
    from_ours: Callable | None = None  # (our key, tensor, cfg) -> value as the format stores it
    # Whether the implementation builds a lateral without BN and ReLU (lateral_norm=False): PySlowFast's
    # FuseFastToSlow always has both, so such weights would load there into another function.
    bare_laterals: bool = True


FORMAT = "slowfast-pipeline"

OWN = Format(
    FORMAT,
    "this project's own (save_checkpoint)",
    "slow.res2.0.a.conv.weight",
    _dotted(_own_name),
    re.compile(r"^(?P<p>slow|fast)\.res(?P<s>\d)\.(?P<b>\d+)\."),
    2,
    {"slow": 0, "fast": 1},
    detect=lambda keys: any(k.startswith(("slow.", "fast.", "lateral.", "head.fc.")) for k in keys),
    two_pathway=lambda keys: any(k.startswith("slow.") for k in keys) and any(k.startswith("fast.") for k in keys),
)
PYTORCHVIDEO = Format(
    "pytorchvideo",
    "pytorchvideo (create_slowfast / create_resnet, hub slowfast_r50, slow_r50 ...)",
    "blocks.1.multipathway_blocks.0.res_blocks.0.branch2.conv_a.weight",
    _dotted(_pytorchvideo_name),
    re.compile(r"^blocks\.(?P<s>\d)\.(?:multipathway_blocks\.(?P<p>\d)\.)?res_blocks\.(?P<b>\d+)\."),
    1,
    {None: 0, "0": 0, "1": 1},
    detect=lambda keys: any(k.startswith("blocks.") for k in keys),
    two_pathway=lambda keys: any(".multipathway_blocks.1." in k for k in keys),
)
PYSLOWFAST = Format(
    "pyslowfast",
    "PySlowFast .pyth (facebookresearch/SlowFast)",
    "s1.pathway0_stem.conv.weight",
    _dotted(_pyslowfast_name),
    re.compile(r"^s(?P<s>\d)\.pathway(?P<p>\d)_res(?P<b>\d+)\."),
    2,
    {"0": 0, "1": 1},
    detect=lambda keys: any(re.match(r"^s[1-5](_fuse)?\.", k) for k in keys),
    two_pathway=lambda keys: any(".pathway1_" in k for k in keys),
    # An early stem_helper.py named the stems s<p>_stem instead of pathway<p>_stem.
    aliases=((r"^s1\.s(\d)_stem\.", r"s1.pathway\1_stem."),),
    bare_laterals=False,
)
CAFFE2 = Format(
    "caffe2",
    "PySlowFast Caffe2 .pkl (its Kinetics/c2 model zoo, CHECKPOINT_TYPE: caffe2)",
    "res2_0_branch2a_w",
    _caffe2_key,
    re.compile(r"^(?P<p>t_)?res(?P<s>\d)_(?P<b>\d+)_branch"),
    2,
    {None: 0, "t_": 1},
    detect=lambda keys: any(k in ("conv1_w", "pred_w") or re.match(r"^(t_)?res\d_\d+_branch", k) for k in keys),
    two_pathway=lambda keys: any(k.startswith("t_") for k in keys),
    to_ours=_caffe2_to_ours,
    from_ours=_caffe2_from_ours,
    bare_laterals=False,
)
MMACTION2 = Format(
    "mmaction2",
    "mmaction2 .pth (Recognizer3D: ResNet3dSlowFast or ResNet3dSlowOnly backbone)",
    "backbone.slow_path.layer1.0.conv1.conv.weight",
    _dotted(_mmaction2_name),
    re.compile(r"^backbone\.(?:(?P<p>slow|fast)_path\.)?layer(?P<s>\d)\.(?P<b>\d+)\."),
    1,
    {None: 0, "slow": 0, "fast": 1},
    detect=lambda keys: any(k.startswith(("backbone.", "cls_head.")) for k in keys),
    two_pathway=lambda keys: any(k.startswith("backbone.fast_path.") for k in keys),
    to_ours=_mmaction2_to_ours,
    from_ours=_mmaction2_from_ours,
)
BY_NAME = {f.name: f for f in (OWN, PYTORCHVIDEO, PYSLOWFAST, CAFFE2, MMACTION2)}


def key_map(model: SlowFast, fmt: Format) -> dict[str, str]:
    """Our state-dict key -> the format's key, for every entry the format stores."""
    two_pathway = model.cfg.arch == "slowfast"
    mapping = {}
    for layer in layers(model):
        for tensor_name in model.get_submodule(layer.module).state_dict():
            foreign = fmt.key(layer, tensor_name, two_pathway)
            if foreign is not None:
                mapping[f"{layer.module}.{tensor_name}"] = foreign
    uncovered = {k for k in model.state_dict() if k not in mapping and not k.endswith(NBT)}
    if uncovered:
        # The network grew a module that `layers` does not know: fix `layers`, not the checkpoint.
        raise RuntimeError(f"checkpoint key mapping does not cover {sorted(uncovered)}")
    return mapping


def stage_blocks(keys, fmt: Format) -> dict[int, tuple[int, ...]]:
    """Blocks per stage res2..res5 of each pathway (0 slow, 1 fast) in a checkpoint, read from its keys."""
    counts: dict[int, list[int]] = {}
    for key in keys:
        m = fmt.block_key.match(key)
        if m and 0 <= int(m["s"]) - fmt.first_stage < 4:
            stage = int(m["s"]) - fmt.first_stage
            blocks = counts.setdefault(fmt.pathway_tokens[m["p"]], [0, 0, 0, 0])
            blocks[stage] = max(blocks[stage], int(m["b"]) + 1)
    return {p: tuple(blocks) for p, blocks in sorted(counts.items())}


def export(model: nn.Module, fmt: Format) -> dict:
    """`model`'s state dict (a SlowFast, unwrapped) under the format's names and value layout."""
    cfg = model.cfg
    if not fmt.bare_laterals and cfg.arch == "slowfast" and cfg.lateral == "time_strided_conv" and not cfg.lateral_norm:
        raise ValueError(
            f"{fmt.title} cannot hold this model: its laterals are bare convolutions "
            "(lateral_norm=False) and that implementation always follows them with batch norm and ReLU. "
            "Export it as 'mmaction2' (lateral_norm=False), 'pytorchvideo' or this project's own format"
        )
    mapping = key_map(model, fmt)
    return {
        mapping[key]: (fmt.from_ours(key, value, model.cfg) if fmt.from_ours else value)
        for key, value in model.state_dict().items()
        if key in mapping
    }
