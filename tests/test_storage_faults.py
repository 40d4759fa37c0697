"""Storage faults are the infrastructure's, never the video's: through a proxy that cuts bodies mid-transfer,
answers 503 SlowDown and resets connections in front of a real S3 endpoint, every video is read (retried) and
committed exactly once; with the videos unreachable nothing is committed for them, the step fails with one clear
line, and the same command after recovery reads them all."""

from __future__ import annotations

import json

import boto3
import pytest

from pipelines import cli
from pipelines.data import run_preprocess, storage_of
from pipelines.storage import ReadFailed, S3Options, Storage, VideoSource
from slowfast.shards import manifest
from slowfast.video.decode import MISSING_FILE, VideoDecodeError

from conftest import pipeline_config
from faults import CUT, FAULTS, RESET, SLOWDOWN, FaultProxy

BUCKET = "flaky"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, synth_set):
    """The synth set under s3://flaky/kinetics, uploaded straight to the endpoint (not through a proxy)."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for path in synth_set.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"kinetics/{path.relative_to(synth_set).as_posix()}")
    return f"s3://{BUCKET}/kinetics"


def config_via(proxy: FaultProxy, tmp_path, synth_set, root: str, **sections):
    return pipeline_config(
        tmp_path,
        synth_set,
        s3={"endpoint_url": proxy.url, "max_attempts": 3},
        data={
            "dataset": "synth",
            "format": "kinetics_csv",
            "video_root": root,
            "annotations": {"train": f"{root}/annotations/train.csv", "val": f"{root}/annotations/val.csv"},
        },
        **sections,
    )


def committed_records(cfg, split: str, prep_hash: str) -> list[manifest.VideoRecord]:
    """Every video record of every commit (a video committed twice appears twice)."""
    folder = manifest.manifest_dir(cfg.data.dataset, split, prep_hash)
    return [v for c in manifest.load_commits(storage_of(cfg), folder) for v in c.videos]


def test_each_fault_is_retried_and_a_missing_object_is_the_videos_fault(s3_endpoint, bucket, synth_set):
    rel = "train/" + next(
        p.relative_to(synth_set / "train").as_posix() for p in sorted((synth_set / "train").rglob("*.mp4"))
    )
    want = (synth_set / rel).read_bytes()
    # Two faults in a row on one object: botocore retries the 503 and the reset, the source retries the cut body.
    for faults in ((CUT, CUT), (SLOWDOWN, RESET), (RESET, CUT), (CUT, SLOWDOWN)):
        with FaultProxy(s3_endpoint, faults=faults) as proxy:
            got = VideoSource(bucket, S3Options(proxy.url, max_attempts=3)).open(rel).read()
            assert got == want, faults
            assert sum(proxy.injected.values()) == 2 and proxy.gets[f"/{BUCKET}/kinetics/{rel}"] == 3
    with FaultProxy(s3_endpoint) as proxy:
        proxy.down = True
        with pytest.raises(ReadFailed, match="next run reads it again") as err:
            VideoSource(bucket, S3Options(proxy.url, max_attempts=2)).open(rel)
        assert rel in str(err.value) and proxy.gets[f"/{BUCKET}/kinetics/{rel}"] >= 2  # botocore retried
        proxy.down = False
        with pytest.raises(VideoDecodeError) as missing:
            VideoSource(bucket, S3Options(proxy.url, max_attempts=2)).open("train/none/nothing.mp4")
        assert missing.value.reason == MISSING_FILE


def test_preprocess_through_a_flaky_network_commits_every_video_exactly_once(
    ray_local, s3_endpoint, bucket, synth_set, tmp_path
):
    # Every video's first GET fails, the kinds in turn; every fourth video fails twice (a cut body, then a reset).
    schedule = ((CUT,), (SLOWDOWN,), (RESET,), (CUT, RESET))
    with FaultProxy(s3_endpoint, faults=lambda n: schedule[n % len(schedule)]) as proxy:
        cfg = config_via(proxy, tmp_path, synth_set, bucket)
        out = run_preprocess(cfg, log=lambda *_: None)

    assert set(proxy.injected) == set(FAULTS)
    assert len(proxy.keys) == 16 and sum(proxy.injected.values()) == 16 + 4  # 12 train + 4 val videos; 4 twice
    for split, videos in (("train", 12), ("val", 4)):
        s = out["splits"][split]
        assert (s["processed"], s["quarantined"], s["unread"]) == (videos, 0, 0), s
        records = committed_records(cfg, split, s["prep_hash"])
        assert sorted(r.video_id for r in records) == sorted({r.video_id for r in records})  # once each
        assert len(records) == videos and not any(r.quarantined for r in records)


def test_videos_unreachable_commit_nothing_and_the_same_command_reads_them_later(
    ray_local, s3_endpoint, bucket, synth_set, tmp_path, capsys
):
    with FaultProxy(s3_endpoint) as proxy:
        cfg = config_via(proxy, tmp_path, synth_set, bucket)
        config = tmp_path / "flaky.yaml"
        config.write_text(json.dumps(json.loads(cfg.model_dump_json())))  # JSON is YAML
        proxy.down = True  # listing and annotations still answer: only the videos' GETs are reset
        assert cli.main(["preprocess", "--config", str(config), "--split", "val"]) == cli.EXIT_FAILED
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert "val: 4 of 4 videos not read" in err[0] and "run the same command again" in err[0], err[0]
        val = [p for p in storage_of(cfg).list("manifests", suffix=".json")]
        assert all(not json.loads(storage_of(cfg).read_bytes(p))["videos"] for p in val)  # nothing committed
        assert proxy.gets and all(n >= 3 for n in proxy.gets.values())  # s3.max_attempts tries per video

        # A tolerance lets the step succeed with the unread counted, still committing nothing for them.
        tolerant = run_preprocess(
            cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"max_unread": 4})}),
            splits=["val"],
            log=lambda *_: None,
        )["splits"]["val"]
        assert (tolerant["processed"], tolerant["quarantined"], tolerant["unread"]) == (0, 0, 4)

        proxy.down = False
        assert cli.main(["preprocess", "--config", str(config), "--split", "val"]) == cli.EXIT_OK
        assert "val: 4 videos" in capsys.readouterr().out
        s = run_preprocess(cfg, splits=["val"], log=lambda *_: None)["splits"]["val"]
        assert (s["processed"], s["quarantined"], s["unread"], s["decoded_now"]) == (4, 0, 0, 0)
        assert len(committed_records(cfg, "val", s["prep_hash"])) == 4


def test_retry_quarantined_decodes_those_videos_again(ray_local, synth_set, tmp_path):
    """A video quarantined by an earlier version (here: a record rewritten to say so) is decoded again on demand,
    and only with a matching reason."""
    cfg = pipeline_config(tmp_path, synth_set)
    s = run_preprocess(cfg, splits=["val"], log=lambda *_: None)["splits"]["val"]
    store = storage_of(cfg)
    folder = manifest.manifest_dir("synth", "val", s["prep_hash"])
    victim = manifest.DatasetState.load(store, folder).videos
    first = sorted(victim)[0]
    record = victim[first]
    record.reason, record.detail, record.shard, record.clips = "decode_error", "an older decoder's verdict", None, 0
    manifest.commit(store, folder, "older-version", [record], [])

    again = run_preprocess(cfg, splits=["val"], log=lambda *_: None, retry_quarantined=frozenset({"truncated"}))[
        "splits"
    ]["val"]
    assert (again["decoded_now"], again["quarantined"]) == (0, 1)
    again = run_preprocess(cfg, splits=["val"], log=lambda *_: None, retry_quarantined=frozenset({"decode_error"}))[
        "splits"
    ]["val"]
    assert (again["decoded_now"], again["processed"], again["quarantined"]) == (1, 4, 0)
    assert not manifest.DatasetState.load(store, folder).videos[first].quarantined


def test_infer_through_a_flaky_network_scores_every_video_exactly_once(
    ray_local, s3_endpoint, bucket, synth_set, tmp_path
):
    from pipelines import tracking
    from pipelines.infer import run_infer
    from pipelines.infer_out import Job
    from slowfast.model import SlowFast
    from slowfast.serving import ClipSpec

    schedule = ((CUT,), (SLOWDOWN,), (RESET,), (CUT, RESET))
    with FaultProxy(s3_endpoint, faults=lambda n: schedule[n % len(schedule)]) as proxy:
        cfg = config_via(
            proxy,
            tmp_path,
            synth_set,
            bucket,
            mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "model_name": "flaky-infer"},
            infer={"commit_every_s": 0.0, "batch_videos": 2},
        )
        net = SlowFast(cfg.model.to_slowfast_config(num_classes=4))
        run_id = tracking.client(cfg).create_run(tracking.experiment_id(cfg, log=lambda *_: None)).info.run_id
        spec = ClipSpec(T=4, tau=4, alpha=4, target_fps=30.0, short_side=48, crop=32, temporal_views=2, spatial_crops=1)
        version = tracking.log_model(cfg, run_id, net=net, class_names=["a", "b", "c", "d"], spec=spec, metadata={})
        out = tmp_path / "scores"
        s = run_infer(
            cfg, f"models:/flaky-infer/{version}", f"{bucket}/val", str(out), Job(top_k=1), log=lambda *_: None
        )

    assert set(proxy.injected) == set(FAULTS) and sum(proxy.injected.values()) == 4 + 1  # 4 val videos; 1 twice
    assert (s["scored_now"], s["quarantined_now"], s["unread_now"]) == (4, 0, 0), s
    records = [v for c in manifest.load_commits(Storage(str(out)), "manifests") for v in c.videos]
    assert sorted(r.video_id for r in records) == sorted(
        f"{bucket}/val/{p.relative_to(synth_set / 'val')}" for p in (synth_set / "val").rglob("*.mp4")
    )
    assert not any(r.quarantined for r in records)
