"""The Ray Data training input: committed shard files -> mixed, augmented uint8 clips for Ray Train.

`train_dataset` builds the stream the workers read (`get_dataset_shard("train")`); `data_config` keeps
Ray Data within `ray.data_cpus` so the train workers keep their CPUs.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from slowfast.shards.schema import ShardMeta

from .config import PipelineConfig
from .storage import Storage

# Shard files read (and their clips mixed) together by one read task; see read_shards.
SHARDS_PER_READ = 4
# Batches' worth of clips each worker holds to shuffle across read groups (uint8: 32 x 224 x 224 clips
# are 5 MB each); the first batch of an epoch waits until the buffer is full.
SHUFFLE_BATCHES = 4
# Train-mode columns that leave Ray Data: the uint8 fast frames once, each clip's crop box not yet resized (the
# box is resized and mirrored, the slow pathway taken from it by index, and both normalised on the device:
# slowfast.train.clip_inputs), where the box lies, the slow indices, labels.
TRAIN_COLUMNS = ["fast", "region", "slow_index", "label"]


@contextlib.contextmanager
def data_context(**settings):
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


def train_dataset(cfg: PipelineConfig, store: Storage, data):
    """Shard list -> read a few shards at a time, mixed (read_shards) -> ClipTransform, train mode, uint8
    -> slow, fast, label.

    The shard list goes in with from_items rather than read_parquet: read_parquet's file listing task
    asks for a whole CPU, which a 2-core machine cannot give while the transform actor holds its share.
    """
    import ray

    from .ray_runtime import data_nodes

    t = cfg.train
    read_cpus, actors, actor_cpus = data_cpu_split(cfg.ray.data_cpus)
    items = [{"path": store.path(p), "skip": json.dumps(sorted(s))} for p, s in data.train_shards]
    # The shard list in a new order on every execution (= every epoch), one block per file; the clips'
    # crops and flips are fresh per epoch too (ClipTransform with epoch=None), since Ray re-runs the same
    # pipeline. (A map, not randomize_block_order: that is an all-to-all step, and Ray Data's no-progress
    # timeout, ray.data_wait_timeout_s, does not watch a pipeline that has one.)
    ds = ray.data.from_items([{"items": json.dumps(items)}], override_num_blocks=1)
    # No CPU of its own (it only permutes a list), which also keeps Ray Data from fusing it with the reads:
    # fused, one task would read every file in turn.
    ds = ds.map_batches(shuffled_files, batch_size=None, batch_format="pyarrow", num_cpus=0, **data_nodes(cfg))
    ds = ds.map_batches(
        read_shards,
        batch_size=SHARDS_PER_READ,
        batch_format="pyarrow",
        num_cpus=read_cpus,
        fn_kwargs={"store": store, "block_rows": t.batch_size},
        **data_nodes(cfg),
    )
    # Tasks, not an actor pool: Ray re-runs the pipeline every epoch, and a new actor (a new process that
    # imports torch) took seconds per epoch to start; tasks land on worker processes that are already warm.
    ds = ds.map_batches(
        train_clips,
        batch_size=t.batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs={"meta": data.train_meta, "crop": t.crop_size, "jitter": t.scale_jitter, "seed": t.seed},
        num_cpus=actor_cpus,
        **data_nodes(cfg),
    )
    return ds.select_columns(TRAIN_COLUMNS)


def shuffled_files(batch: pa.Table):
    """The shard list (one JSON row) -> its files in a fresh random order, one block per file."""
    items = [row for text in batch.column("items").to_pylist() for row in json.loads(text)]
    for k in np.random.default_rng().permutation(len(items)):
        yield pa.table({"path": [items[k]["path"]], "skip": [items[k]["skip"]]})


def train_clips(batch: pa.Table, meta: ShardMeta, crop: int, jitter: tuple[int, int], seed: int) -> dict:
    """Shard rows -> augmented uint8 clips (ClipTransform in train mode; normalised on the device)."""
    from slowfast.shards.reader import ClipTransform

    return ClipTransform(meta, "train", crop, jitter=jitter, seed=seed, reuse_buffers=False)(batch)


def read_shards(batch: pa.Table, store: Storage, block_rows: int):
    """{"path", "skip"} rows (a few shard files) -> their clips, mixed across the files, in blocks.

    Preprocessing writes videos in annotation order, and annotation files are usually sorted by class,
    so one shard tends to hold one class; reading SHARDS_PER_READ shards together and permuting their
    rows keeps batches from being single-class. Skipped ids ("skip": a JSON list) are clips that a newer
    commit re-decoded into another shard (DatasetState.readable). The order is fresh on every call.
    """
    from slowfast.shards.reader import COLUMNS

    tables = []
    for path, skip in zip(batch.column("path").to_pylist(), batch.column("skip").to_pylist(), strict=True):
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
    return ray.train.DataConfig(
        datasets_to_split=["train"], execution_options={"train": ExecutionOptions(resource_limits=limits)}
    )
