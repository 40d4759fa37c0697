"""Starting or joining Ray: one place, so every step sees the same cluster."""
from __future__ import annotations

import logging
import os

from .config import PipelineConfig


def init_ray(cfg: PipelineConfig) -> None:
    """Join `ray.address` (a cluster; "auto" finds one started with `ray start` on this machine), or the
    cluster `ray job submit` runs us in (RAY_ADDRESS), else start a private local Ray: never join some
    other cluster that happens to run on this machine by accident."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
             include_dashboard=False if address == "local" else None, ignore_reinit_error=True)
