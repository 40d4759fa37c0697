"""The pipeline config: YAML in, typed config out, every mistake named by key path with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, PipelineConfig, load_config
from slowfast.model import PRESETS, SlowFastConfig

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FINETUNE = DEMO.parent / "finetune.yaml"


def write(tmp_path: Path, data: dict, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def demo_with(tmp_path: Path, **sections) -> Path:
    """The demo config with some sections' keys replaced or added."""
    data = yaml.safe_load(DEMO.read_text())
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section].update(value)
        else:
            data[section] = value
    return write(tmp_path, data)


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return [line.strip() for line in message.splitlines()[1:]]


def test_demo_config_loads_with_the_values_the_demo_needs():
    cfg = load_config(DEMO)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == "demo"
    assert cfg.storage_root == "./storage/demo"
    assert cfg.data.format == "kinetics_csv"
    assert cfg.data.synth is not None and cfg.data.synth.classes >= 6
    assert cfg.model.preset == "slowfast_tiny"
    assert cfg.train.crop_size <= 96 and not cfg.train.use_gpu
    assert cfg.evaluate.temporal_views <= cfg.preprocess.eval_views
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    assert cfg.ray.address is None and cfg.ray.data_cpus >= 1
    net = cfg.model.to_slowfast_config()
    assert type(net) is SlowFastConfig
    # The preset, with the Fast pathway fed frame differences (the paper's Time-diff. input).
    assert net == PRESETS["slowfast_tiny"].model_copy(update={"fast_input": "time_difference"})
    assert cfg.model.overrides() == {"fast_input": "time_difference"}


def test_finetune_config_fits_the_pyslowfast_kinetics_checkpoint_it_names():
    from pipelines.train import check_config
    from slowfast.model import build, check_checkpoint, export_state_dict

    cfg = load_config(FINETUNE)
    check_config(cfg)
    assert (cfg.data.format, cfg.data.annotations) == ("folder", {})
    assert cfg.model.preset == "slowfast_8x8_r50" and cfg.model.overrides() == {}
    assert cfg.train.init_from.endswith("SLOWFAST_8x8_R50.pkl")  # PySlowFast's model-zoo file name
    assert (cfg.train.freeze_up_to, cfg.train.freeze_bn, cfg.train.head_lr_mult) == ("none", False, 5.0)
    assert cfg.train.warmup_epochs < cfg.train.epochs < 196  # a fine-tune, not the paper's schedule from scratch
    assert cfg.evaluate.temporal_views <= cfg.preprocess.eval_views
    # The model-zoo file is a Caffe2 pickle of Kinetics-400 weights: its blobs fit the config's model at another
    # class count, the head re-initialised.
    blobs = export_state_dict(build("slowfast_8x8_r50", num_classes=400), "caffe2")
    report = check_checkpoint(
        cfg.model.to_slowfast_config(num_classes=5),
        {"blobs": blobs},
        head="auto",
        class_names=[f"class {i}" for i in range(5)],
    )
    assert report.format == "caffe2" and report.reinitialised == ("head.fc.weight", "head.fc.bias")


def test_unknown_top_level_key_is_named_with_the_allowed_keys(tmp_path):
    lines = problems(demo_with(tmp_path, nmae="x"))
    assert lines == [
        "nmae: unknown key; allowed: name, storage_root, shared_filesystem, s3, data, preprocess, model, train, "
        "evaluate, mlflow, ray, infer"
    ]


def test_unknown_nested_keys_are_all_reported_with_their_paths(tmp_path):
    path = demo_with(tmp_path, model={"foo": 1}, train={"lrr": 0.1})
    lines = problems(path)
    assert len(lines) == 2
    model_line = next(line for line in lines if line.startswith("model.foo: unknown key; allowed: "))
    assert "alpha" in model_line and "lateral" in model_line and "preset" in model_line
    train_line = next(line for line in lines if line.startswith("train.lrr: unknown key; allowed: "))
    assert "base_lr" in train_line and "epochs" in train_line
    with pytest.raises(ConfigError, match=r"^.*pipe\.yaml: invalid config, 2 problems:"):
        load_config(path)


def test_unknown_key_in_an_optional_subsection_lists_that_subsection(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data["data"]["synth"]["colour"] = "red"
    lines = problems(write(tmp_path, data))
    assert lines[0].startswith("data.synth.colour: unknown key; allowed: classes, videos_per_class")


def test_bad_choice_lists_the_allowed_values_and_the_given_one(tmp_path):
    lines = problems(DEMO, ["preprocess.frame_format=png", "model.lateral=diagonal", "evaluate.spatial_crops=2"])
    assert (
        "preprocess.frame_format: Input should be 'jpeg' or 'raw' (got 'png')  "
        "[from --set preprocess.frame_format=png]" in lines
    )
    lateral = next(line for line in lines if line.startswith("model.lateral: "))
    for allowed in ("time_strided_conv", "time_to_channel", "time_strided_sampling", "none", "'diagonal'"):
        assert allowed in lateral
    crops = next(line for line in lines if line.startswith("evaluate.spatial_crops: "))
    assert "1 or 3" in crops and "(got 2)" in crops


def test_set_overrides_apply_with_yaml_types():
    cfg = load_config(
        DEMO,
        [
            "model.alpha=8",
            "model.fast_input=rgb",
            "train.epochs=3",
            "train.scale_jitter=[80, 100]",
            "train.nesterov=false",
            "train.grad_clip=1.5",
            "ray.address=auto",
            "storage_root=s3://bucket/runs/demo",
        ],
    )
    assert cfg.model.alpha == 8
    assert cfg.model.to_slowfast_config().fast_frames == 8 * cfg.model.T
    assert cfg.model.overrides() == {"alpha": 8}
    assert cfg.train.epochs == 3
    assert cfg.train.scale_jitter == (80, 100)
    assert cfg.train.nesterov is False
    assert cfg.train.grad_clip == 1.5
    assert cfg.ray.address == "auto"
    assert cfg.storage_root == "s3://bucket/runs/demo"


def test_set_into_unknown_or_non_section_keys_fails(tmp_path):
    assert problems(DEMO, ["train.lrr=1"]) == [
        "train.lrr: unknown key; allowed: epochs, batch_size, base_lr, warmup_epochs, weight_decay, momentum, "
        "nesterov, grad_clip, crop_size, scale_jitter, num_workers, use_gpu, cpus_per_worker, "
        "resources_per_worker, threads_per_worker, max_failures, keep_checkpoints, mixed_precision, seed, "
        "init_from, init_head, freeze_up_to, freeze_bn, head_lr_mult  "
        "[from --set train.lrr=1]"
    ]
    assert problems(DEMO, ["name.first=x"]) == [
        "name: is a value ('demo'), not a section; cannot set 'name.first'  [from --set name.first=x]"
    ]
    assert problems(DEMO, ["train.epochs"])[0].startswith("--set 'train.epochs': expected KEY=VALUE")
    # A section the file leaves out is created by --set, and its keys are still checked.
    data = yaml.safe_load(DEMO.read_text())
    del data["evaluate"]
    path = write(tmp_path, data)
    assert load_config(path, ["evaluate.temporal_views=2"]).evaluate.temporal_views == 2
    assert problems(path, ["evaluate.views=2"])[0].startswith("evaluate.views: unknown key")


def test_unknown_preset_lists_the_known_ones():
    (line,) = problems(DEMO, ["model.preset=slowfast_16x8"])
    assert line.startswith("model.preset: unknown preset 'slowfast_16x8'; known presets: ")
    for name in PRESETS:
        assert name in line


def test_preset_fills_unset_fields_and_explicit_fields_win():
    cfg = load_config(DEMO, ["model.preset=slowfast_8x8_r101", "model.fast_input=rgb"])
    assert cfg.model.to_slowfast_config() == PRESETS["slowfast_8x8_r101"]
    cfg = load_config(
        DEMO, ["model.preset=slowfast_4x16_r50", "model.alpha=4", "model.beta=1/8", "model.fast_input=rgb"]
    )
    assert (cfg.model.T, cfg.model.tau, cfg.model.alpha, cfg.model.fusion_kernel) == (4, 16, 4, 5)
    assert cfg.model.overrides() == {"alpha": 4}


def test_sum_fusion_incompatibility_is_reported_at_model():
    (line,) = problems(DEMO, ["model.fusion=sum", "model.lateral=time_to_channel"])
    assert line.startswith("model: fusion='sum' with lateral='time_to_channel' needs lateral channels")
    assert "[from --set model.fusion=sum]" in line


def test_checks_across_fields_and_sections(tmp_path):
    assert problems(DEMO, ["evaluate.temporal_views=10"]) == [
        "evaluate.temporal_views: 10 views but only preprocess.eval_views=4 are pre-sampled; "
        "lower one or raise the other"
    ]
    (line,) = problems(DEMO, ["train.crop_size=96"])
    assert line.startswith("train: crop_size 96 is larger than the smallest jittered short side 64")
    (line,) = problems(DEMO, ["storage_root=gs://bucket/x"])
    assert line.startswith("storage_root: must be a local folder or s3://bucket/prefix")
    (line,) = problems(DEMO, ["data.val_split=test"])
    assert line.startswith("data: split 'test' has no annotation file; annotations has: train, val")
    (line,) = problems(DEMO, ["train.momentum=1.5"])
    assert line == "train.momentum: Input should be less than 1 (got 1.5)  [from --set train.momentum=1.5]"


def test_missing_required_sections_are_named(tmp_path):
    lines = problems(write(tmp_path, {"name": "x"}))
    assert sorted(lines) == ["data: required key is missing", "model: required key is missing"]
    lines = problems(
        write(tmp_path, {"name": "x", "data": {"dataset": "d", "format": "folder", "video_root": "v"}, "model": {}})
    )
    assert lines == ["model.preset: required key is missing"]


def test_data_keys_must_fit_the_format(tmp_path):
    (line,) = problems(DEMO, ["data.format=folder"])
    assert line.startswith("data.annotations: format folder takes labels from the folder names")
    assert "remove data.annotations (--set data.annotations={})" in line
    (line,) = problems(DEMO, ["data.annotations={}"])
    assert line.startswith("data.annotations: format kinetics_csv needs an annotation file per split")
    assert line.endswith("for a folder per class set data.format: folder  [from --set data.annotations={}]")
    data = yaml.safe_load(DEMO.read_text())
    del data["data"]["video_root"]
    assert "data.video_root: required key is missing" in problems(write(tmp_path, data))
    assert problems(DEMO, ["data.video_root=' '"]) == [
        "data.video_root: is empty; set it to the folder or s3://bucket/prefix that holds the videos"
        "  [from --set data.video_root=' ']"
    ]
    (line,) = problems(DEMO, ["data.format=folder", "data.annotations={}", "data.val_fraction=1"])
    assert line == "data.val_fraction: Input should be less than 1 (got 1)  [from --set data.val_fraction=1]"


def test_a_folder_of_videos_needs_only_its_root(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    del data["data"]["annotations"]
    cfg = load_config(write(tmp_path, data), ["data.format=folder"])
    assert (cfg.data.format, cfg.data.annotations, cfg.data.val_fraction) == ("folder", {}, 0.2)


def test_file_problems_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file; pass --config"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: demo\ndata:\n  dataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: YAML syntax error at line \d+, column \d+"):
        load_config(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: YAML syntax error at line 2, column 1: duplicate key 'name'"):
        load_config(twice)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text("- name\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(listed)


def test_hash_is_stable_and_changes_with_an_override():
    first, second = load_config(DEMO), load_config(DEMO)
    assert first.config_hash() == second.config_hash()
    assert len(first.config_hash()) == 64
    epochs = load_config(DEMO, ["train.epochs=3"])
    assert epochs.config_hash() != first.config_hash()
    # Section hashes: a train change leaves the preprocessing hash (and so the shards) alone.
    assert epochs.config_hash("preprocess") == first.config_hash("preprocess")
    assert load_config(DEMO, ["preprocess.short_side=80"]).config_hash("preprocess") != first.config_hash("preprocess")
    # Spelling a preset's own value explicitly is the same config.
    assert load_config(DEMO, [f"model.alpha={PRESETS['slowfast_tiny'].alpha}"]).config_hash() == first.config_hash()


def test_resolved_config_round_trips_with_preset_overrides(tmp_path):
    cfg = load_config(
        DEMO,
        [
            "model.preset=slowfast_4x16_r50",
            "model.lateral=time_strided_sampling",
            "model.fast_input=rgb",
            "train.epochs=3",
        ],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert again.model.preset == "slowfast_4x16_r50"
    assert again.model.overrides() == {"lateral": "time_strided_sampling"}


def test_flatten_gives_dotted_keys_for_every_value():
    cfg = load_config(DEMO)
    flat = cfg.flatten()
    assert flat["name"] == "demo"
    assert flat["model.preset"] == "slowfast_tiny"
    assert flat["model.alpha"] == PRESETS["slowfast_tiny"].alpha
    assert flat["train.base_lr"] == 0.1
    assert flat["data.annotations.train"] == "./storage/demo/videos/annotations/train.csv"
    assert flat["data.synth.classes"] == cfg.data.synth.classes
    assert flat["mlflow.experiment"] == "demo"
    assert not any(isinstance(value, dict) for value in flat.values())


def test_mlflow_names_default_to_the_pipeline_name(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    del data["mlflow"]
    cfg = load_config(write(tmp_path, data), ["name=nightly"])
    assert (cfg.mlflow.experiment, cfg.mlflow.model_name) == ("nightly", "nightly")
    assert cfg.mlflow.tracking_uri == "sqlite:///mlflow.db"
