"""The checkpoint formats users hold besides pytorchvideo's: PySlowFast's Caffe2 .pkl (read without running
pickled code, Python 2 pickles included) and mmaction2's .pth. Each is built from a reference network's
weights under the implementation's published naming, written to a file, loaded, and checked logit for
logit; a checkpoint of a network this project does not build is refused with the difference named.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import pickletools
import re
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from slowfast.model import CheckpointError, build, check_checkpoint, export_state_dict, load_checkpoint, resolve

from reference import assert_same_logits, assert_same_state, logits, pytorchvideo, randomize

# Any size works: our head pools globally, and the reference's average pool is given the res5 map's
# size (64 px -> 2 x 2), which makes it global too. Small keeps two R50s per preset cheap on a CPU.
SIZE = 64
# The paper's two R50 settings as PySlowFast's c2 configs (and pytorchvideo's create_slowfast) give them:
# frames (slow, fast), lateral kernel (FUSION_KERNEL_SZ) and stride (ALPHA).
SETTINGS = {"slowfast_8x8_r50": ((8, 32), 7, 4), "slowfast_4x16_r50": ((4, 32), 5, 8)}
# The fast pathway's last block in res2, res3, res4 of a ResNet-50: Caffe2 names each lateral after it.
R50_LAST_BLOCKS = {1: 2, 2: 3, 3: 5}


@dataclass(frozen=True)
class Reference:
    state: dict  # pytorchvideo create_slowfast state dict
    clip: list
    logits: torch.Tensor


@functools.cache
def reference(preset: str, lateral_norm: bool = True) -> Reference:
    """lateral_norm=False: pytorchvideo's fusion built with norm=None, activation=None, the bare strided conv
    (bias=False, then concatenated after the slow features) that mmaction2's lateral_norm=False computes."""
    (slow, fast), kernel, alpha = SETTINGS[preset]
    fusion = {}
    if not lateral_norm:
        # The module pytorchvideo() imported (with its torchvision stand-in), taken from sys.modules.
        builder = importlib.import_module(pytorchvideo().create_slowfast.__module__).FastToSlowFusionBuilder
        fusion["fusion_builder"] = builder(
            slowfast_channel_reduction_ratio=8,
            conv_fusion_channel_ratio=2,
            conv_kernel_size=(kernel, 1, 1),
            conv_stride=(alpha, 1, 1),
            norm=None,
            activation=None,
            max_stage_idx=3,
        ).create_module
    model = pytorchvideo().create_slowfast(
        model_depth=50,
        slowfast_fusion_conv_kernel_size=(kernel, 1, 1),
        slowfast_fusion_conv_stride=(alpha, 1, 1),
        head_pool_kernel_sizes=((slow, 2, 2), (fast, 2, 2)),
        **fusion,
    )
    randomize(model, (slow, fast), seed=kernel, size=SIZE)
    g = torch.Generator().manual_seed(alpha)
    clip = [torch.randn(1, 3, slow, SIZE, SIZE, generator=g), torch.randn(1, 3, fast, SIZE, SIZE, generator=g)]
    return Reference(model.state_dict(), clip, logits(model, clip))


# --- Caffe2 names, from PySlowFast's c2_model_loading.get_name_convert_func ------------------------
# Its regexes turn these blob names into PySlowFast's module names; written here from pytorchvideo's
# names and independent of slowfast/model/formats.py. BN blobs: _s scale, _b bias, _rm running mean,
# _riv running variance; the fast pathway's names start with t_; laterals end in _subsample.

C2_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}


def caffe2_name(key: str, last_blocks: dict[int, int]) -> str | None:
    if key.endswith("num_batches_tracked"):
        return None
    if m := re.fullmatch(r"blocks\.0\.multipathway_blocks\.(\d)\.(conv|norm)\.(\w+)", key):
        fast = "t_" if m[1] == "1" else ""
        return f"{fast}conv1_w" if m[2] == "conv" else f"{fast}res_conv1_bn_{C2_BN[m[3]]}"
    if m := re.fullmatch(r"blocks\.(\d)\.multipathway_fusion\.(conv_fast_to_slow|norm)\.(\w+)", key):
        stage = int(m[1])
        base = "t_pool1_subsample" if stage == 0 else f"t_res{stage + 1}_{last_blocks[stage]}_branch2c_bn_subsample"
        return f"{base}_w" if m[2] == "conv_fast_to_slow" else f"{base}_bn_{C2_BN[m[3]]}"
    if m := re.fullmatch(
        r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\."
        r"(branch1_conv|branch1_norm|branch2\.conv_[abc]|branch2\.norm_[abc])\.(\w+)",
        key,
    ):
        fast = "t_" if m[2] == "1" else ""
        branch = "branch1" if m[4].startswith("branch1") else f"branch2{m[4][-1]}"
        base = f"{fast}res{int(m[1]) + 1}_{m[3]}_{branch}"
        return f"{base}_w" if "conv" in m[4] else f"{base}_bn_{C2_BN[m[5]]}"
    return {"blocks.6.proj.weight": "pred_w", "blocks.6.proj.bias": "pred_b"}[key]


def caffe2_blobs(state: dict, last_blocks=R50_LAST_BLOCKS, value=lambda v: v.numpy()) -> dict:
    blobs = {caffe2_name(k, last_blocks): value(v) for k, v in state.items() if caffe2_name(k, last_blocks)}
    # Caffe2 saves the solver's state beside the weights; PySlowFast skips these names.
    return blobs | {
        "conv1_w_momentum": np.zeros_like(blobs["conv1_w"]),
        "lr": np.array([0.1], np.float32),
        "model_iter": np.array([150000], np.int64),
    }


class Python2Pickler(pickle._Pickler):
    """What Python 2 wrote for PySlowFast's .pkl files: protocol 2, every string a byte string (BINSTRING,
    Python 2's str), numpy 1's module path for the array reconstructor."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str

    def save_global(self, obj, name=None):
        if obj is np.zeros(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_python2_pickle(path, obj) -> bytes:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(obj)
    return path.read_bytes()


@pytest.mark.parametrize("preset, writer", [("slowfast_8x8_r50", "python2"), ("slowfast_4x16_r50", "python3")])
def test_caffe2_pkl_gives_the_reference_logits(tmp_path, preset, writer):
    ref = reference(preset)
    path = tmp_path / f"SLOWFAST_{preset}.pkl"
    published = caffe2_blobs(ref.state)
    assert {
        "conv1_w",
        "t_res_conv1_bn_riv",
        "res4_5_branch2a_w",
        "t_res2_0_branch1_bn_rm",
        "t_pool1_subsample_w",
        "t_res4_5_branch2c_bn_subsample_bn_s",
        "pred_w",
    } <= set(published)
    # Byte-string blob names, as Python 2 keeps them in the published files.
    blobs = {name.encode() if writer == "python2" else name: value for name, value in published.items()}
    if writer == "python2":
        data = write_python2_pickle(path, {"blobs": blobs})
        opcodes = {op.name for op, _, _ in pickletools.genops(data)}
        assert "SHORT_BINSTRING" in opcodes and "BINSTRING" in opcodes and "BINUNICODE" not in opcodes
        assert b"numpy.core.multiarray\n_reconstruct" in data
    else:
        path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))  # Python 3's protocol 2: _codecs.encode

    model = build(preset)
    info = load_checkpoint(model, path)
    assert (info.format, info.pathways, info.source) == ("caffe2", 2, str(path))
    assert info.loaded == len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    assert info.reinitialised == () and info.checkpoint_classes == 400
    assert_same_logits(ref.logits, logits(model, ref.clip))

    exported = export_state_dict(model, "caffe2")  # the way back: the published names and values
    weights = {k: v for k, v in published.items() if k not in ("conv1_w_momentum", "lr", "model_iter")}
    assert set(exported) == set(weights)
    assert all(np.array_equal(exported[name], value) for name, value in weights.items())


# --- mmaction2 names, from its resnet3d_slowfast.py, resnet3d.py and slowfast_head.py --------------
# Recognizer3D: backbone.{slow,fast}_path (ResNet3dPathway), stem conv1, stages layer1..layer4 of
# Bottleneck3d conv1/conv2/conv3 + downsample, each a ConvModule (.conv, .bn); laterals in the slow
# path as conv1_lateral and layer<i>_lateral (with .bn when lateral_norm=True); head cls_head.fc_cls.

MM_PATH = {"0": "slow_path", "1": "fast_path"}
MM_PART = {"branch1_conv": "downsample.conv", "branch1_norm": "downsample.bn"} | {
    f"branch2.{kind}_{p}": f"conv{n}.{'conv' if kind == 'conv' else 'bn'}"
    for n, p in enumerate("abc", start=1)
    for kind in ("conv", "norm")
}


def mmaction2_name(key: str) -> str:
    if m := re.fullmatch(r"blocks\.0\.multipathway_blocks\.(\d)\.(conv|norm)\.(\w+)", key):
        return f"backbone.{MM_PATH[m[1]]}.conv1.{'conv' if m[2] == 'conv' else 'bn'}.{m[3]}"
    if m := re.fullmatch(r"blocks\.(\d)\.multipathway_fusion\.(conv_fast_to_slow|norm)\.(\w+)", key):
        lateral = "conv1_lateral" if m[1] == "0" else f"layer{m[1]}_lateral"
        return f"backbone.slow_path.{lateral}.{'conv' if m[2] == 'conv_fast_to_slow' else 'bn'}.{m[3]}"
    if m := re.fullmatch(r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.(.+)\.(\w+)", key):
        return f"backbone.{MM_PATH[m[2]]}.layer{m[1]}.{m[3]}.{MM_PART[m[4]]}.{m[5]}"
    return {"blocks.6.proj.weight": "cls_head.fc_cls.weight", "blocks.6.proj.bias": "cls_head.fc_cls.bias"}[key]


def mmaction2_state(state: dict, slow_features: int = 2048) -> dict:
    out = {mmaction2_name(k): v for k, v in state.items()}
    # SlowFastHead concatenates the pooled pathways as (fast, slow); pytorchvideo as (slow, fast).
    w = out["cls_head.fc_cls.weight"]
    out["cls_head.fc_cls.weight"] = torch.cat([w[:, slow_features:], w[:, :slow_features]], dim=1)
    return out


@pytest.mark.parametrize("preset", SETTINGS)
def test_mmaction2_pth_gives_the_reference_logits(tmp_path, preset):
    ref = reference(preset)
    state = mmaction2_state(ref.state)
    assert {
        "backbone.slow_path.conv1.conv.weight",
        "backbone.fast_path.layer3.5.conv1.bn.running_var",
        "backbone.slow_path.layer1.0.downsample.conv.weight",
        "backbone.slow_path.conv1_lateral.conv.weight",
        "backbone.slow_path.layer3_lateral.bn.weight",
        "cls_head.fc_cls.bias",
    } <= set(state)
    path = tmp_path / "slowfast_r50_kinetics400-rgb.pth"
    torch.save({"meta": {"epoch": 256, "dataset_meta": {}}, "state_dict": state}, path)  # mmengine's layout

    model = build(preset)
    info = load_checkpoint(model, path)
    assert (info.format, info.pathways, info.extra["meta"]["epoch"]) == ("mmaction2", 2, 256)
    assert_same_logits(ref.logits, logits(model, ref.clip))
    exported = export_state_dict(model, "mmaction2")
    assert set(exported) == set(state)
    assert torch.equal(exported["cls_head.fc_cls.weight"], state["cls_head.fc_cls.weight"])


def test_mmaction2_slow_only_loads_every_tensor():
    # ResNet3dSlowOnly has no slow_path level: backbone.conv1, backbone.layer1..4; I3DHead fc_cls.
    source = build("slow_tiny", num_classes=7)
    state = {}
    for key, value in export_state_dict(source, "pytorchvideo").items():
        if m := re.fullmatch(r"blocks\.0\.(conv|norm)\.(\w+)", key):
            state[f"backbone.conv1.{'conv' if m[1] == 'conv' else 'bn'}.{m[2]}"] = value
        elif m := re.fullmatch(r"blocks\.(\d)\.res_blocks\.(\d+)\.(.+)\.(\w+)", key):
            state[f"backbone.layer{m[1]}.{m[2]}.{MM_PART[m[3]]}.{m[4]}"] = value
        else:
            state[key.replace("blocks.5.proj", "cls_head.fc_cls")] = value
    model = build("slow_tiny", num_classes=7)
    assert load_checkpoint(model, {"state_dict": state}).format == "mmaction2"
    assert_same_state(model, source)


def test_mmaction2_bare_laterals_give_the_reference_logits(tmp_path):
    # mmaction2's default lateral_norm=False: each lateral is the strided conv alone, no BN and no ReLU.
    ref = reference("slowfast_8x8_r50", lateral_norm=False)
    state = mmaction2_state(ref.state)
    assert "backbone.slow_path.layer3_lateral.conv.weight" in state
    assert not [k for k in state if "_lateral.bn." in k]
    path = tmp_path / "slowfast_r50_8xb8-8x8x1-256e_kinetics400-rgb.pth"
    torch.save({"meta": {"epoch": 256}, "state_dict": state}, path)

    model = build("slowfast_8x8_r50", lateral_norm=False)
    tensors = sum(not k.endswith("num_batches_tracked") for k in state)
    assert check_checkpoint(model.cfg, path).loaded == tensors
    info = load_checkpoint(model, path)
    assert (info.format, info.loaded) == ("mmaction2", tensors)
    assert_same_logits(ref.logits, logits(model, ref.clip))
    exported = export_state_dict(model, "mmaction2")
    assert set(exported) == set(state)
    assert all(torch.equal(exported[k], v) for k, v in state.items())


def test_mmaction2_lateral_norm_mismatch_is_refused_naming_the_setting():
    bare = mmaction2_state(reference("slowfast_8x8_r50", lateral_norm=False).state)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve("slowfast_8x8_r50"), {"state_dict": bare})
    message = str(err.value)
    assert "the checkpoint's network has lateral_norm=False where the model has lateral_norm=True" in message
    assert "bare convolutions (mmaction2's default lateral_norm=False" in message
    assert "set model.lateral_norm: false in the pipeline config" in message
    assert (
        "to load it: build the model with lateral_norm=False (preset slowfast_8x8_r50 with lateral_norm=False)"
        in message
    )
    assert "missing from the checkpoint (16)" in message  # 4 laterals x 4 BN tensors (step counters optional)

    # The other way round: BN laterals offered to a bare-lateral model are 16 (+4 step counters) extra keys.
    normed = export_state_dict(build("slowfast_8x8_r50"), "mmaction2")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve("slowfast_8x8_r50", lateral_norm=False), {"state_dict": normed})
    message = str(err.value)
    assert "set model.lateral_norm: true (the default)" in message
    assert "unexpected in the checkpoint (16)" in message


@pytest.mark.parametrize("fmt", ["pyslowfast", "caffe2"])
def test_bare_laterals_are_not_exported_where_the_laterals_always_have_bn(fmt):
    with pytest.raises(ValueError, match="bare convolutions \\(lateral_norm=False\\).*Export it as 'mmaction2'"):
        export_state_dict(build("slowfast_tiny", lateral_norm=False), fmt)


# --- unpickling runs nothing ---------------------------------------------------------------------


class RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pkl_holding_more_than_arrays_is_refused_without_running_it(tmp_path, protocol):
    marker, path = tmp_path / "it-ran", tmp_path / "SLOWFAST_8x8_R50.pkl"
    blobs = {"conv1_w": np.zeros((8, 3, 1, 7, 7), np.float32), "res_conv1_bn_s": [RunsACommand(marker)]}
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=protocol))
    model = build("slowfast_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    assert str(err.value).startswith(f"{path}: refused to unpickle {os.system.__module__}.system")
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pickle.loads(path.read_bytes())  # the file is a real threat: an ordinary unpickler runs the command
    assert marker.exists()


def test_torch_file_holding_more_than_tensors_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "it-ran", tmp_path / "model.pth"
    torch.save({"state_dict": {"cls_head.fc_cls.bias": torch.zeros(2)}, "hook": RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError, match=f"weights-only .*GLOBAL {os.system.__module__}.system") as err:
        load_checkpoint(build("slowfast_tiny"), path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_codecs_global_is_pinned_to_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    # {"blobs": _codecs.encode("x", "rot13")} in protocol-2 opcodes.
    path.write_bytes(
        b"\x80\x02}q\x00X\x05\x00\x00\x00blobsq\x01c_codecs\nencode\nq\x02X\x01\x00\x00\x00x"
        b"X\x05\x00\x00\x00rot13\x86q\x03Rq\x04s."
    )
    with pytest.raises(CheckpointError, match=r"refused to unpickle _codecs\.encode\(\.\.\., 'rot13'\)"):
        load_checkpoint(build("slowfast_tiny"), path)


def test_legacy_torch_pyth_is_read(tmp_path):
    # PySlowFast's 2019 .pyth files predate torch.save's zip format.
    model = build("slowfast_tiny", num_classes=3)
    path = tmp_path / "checkpoint_epoch_00196.pyth"
    torch.save(
        {"epoch": 196, "model_state": export_state_dict(model, "pyslowfast")},
        path,
        _use_new_zipfile_serialization=False,
    )
    for source in (path, io.BytesIO(path.read_bytes())):  # a path, or the bytes fetched from object storage
        restored = build("slowfast_tiny", num_classes=3)
        info = load_checkpoint(restored, source)
        assert (info.format, info.extra["epoch"]) == ("pyslowfast", 196)
        assert_same_state(restored, model)


# --- networks this project does not build ---------------------------------------------------------


def meta_state(builder) -> dict:
    """A network's state dict with shapes and no memory."""
    with torch.device("meta"):
        return builder().state_dict()


def test_4x16_checkpoint_into_the_8x8_model_names_the_preset():
    blobs = caffe2_blobs(reference("slowfast_4x16_r50").state)
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve("slowfast_8x8_r50"), {"blobs": blobs})
    message = str(err.value)
    assert "the checkpoint's network has fusion_kernel=5 where the model has fusion_kernel=7" in message
    assert "to load it: build the model with fusion_kernel=5 (preset slowfast_4x16_r50)" in message
    assert check_checkpoint(resolve("slowfast_4x16_r50"), {"blobs": blobs}).loaded == len(blobs) - 3  # no solver blobs


def test_pyslowfast_r101_50_50_is_refused_naming_the_temporal_kernels():
    # SLOWFAST_8x8_R101_50_50 (PySlowFast configs/Kinetics/c2): depth 101 with NUM_BLOCK_TEMP_KERNEL
    # [[3, 3], [4, 4], [6, 6], [3, 3]]: only the first 6 of res4's 23 blocks have a temporal conv_a.
    blobs = caffe2_blobs(
        meta_state(lambda: pytorchvideo().hub.slowfast_r101(pretrained=False)),
        {1: 2, 2: 3, 3: 22},
        value=lambda v: np.broadcast_to(np.float32(0), v.shape),
    )
    for name, value in list(blobs.items()):
        m = re.fullmatch(r"(t_)?res4_(\d+)_branch2a_w", name)
        if m and int(m[2]) >= 6:
            blobs[name] = np.broadcast_to(np.float32(0), value.shape[:2] + (1, 1, 1))
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve("slowfast_8x8_r101"), {"blobs": blobs})
    message = str(err.value)
    assert (
        "res4 of the slow pathway has temporal kernel 3 in blocks 0-5, 1 in blocks 6-22 (PySlowFast's "
        "NUM_BLOCK_TEMP_KERNEL, as in its R101_50_50 models)"
    ) in message
    assert "no preset or config field fits it; the nearest is preset slowfast_8x8_r101" in message
    assert "shape mismatch (34)" in message  # blocks 6-22 of both pathways


def test_mmaction2_r101_r50_is_refused_naming_the_depths():
    # slowfast_r101-r50_32xb8-4x16x1: a 101-layer slow pathway beside a 50-layer fast one.
    r101 = mmaction2_state(meta_state(lambda: pytorchvideo().hub.slowfast_r101(pretrained=False)))
    r50 = mmaction2_state(meta_state(lambda: pytorchvideo().hub.slowfast_r50(pretrained=False)))
    state = {k: v for k, v in r101.items() if not k.startswith("backbone.fast_path.")} | {
        k: v for k, v in r50.items() if k.startswith("backbone.fast_path.")
    }
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "blocks in res2..res5 differ by pathway (slow pathway (3, 4, 23, 3), fast pathway (3, 4, 6, 3)); "
            "this project builds both pathways with one depth: no preset or config field fits it"
        ),
    ):
        check_checkpoint(resolve("slowfast_8x8_r101"), {"state_dict": state})


def test_other_width_names_the_field():
    with torch.device("meta"):
        state = export_state_dict(build("slowfast_8x8_r50", width=32), "pyslowfast")
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(resolve("slowfast_8x8_r50"), {"model_state": state})
    assert "to load it: build the model with width=32 (preset slowfast_8x8_r50 with width=32)" in str(err.value)
