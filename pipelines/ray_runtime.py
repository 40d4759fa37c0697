"""Starting or joining Ray: one place, so every step sees the same cluster."""
from __future__ import annotations

import logging
import os

from .config import PipelineConfig


def init_ray(cfg: PipelineConfig) -> None:
    """Join `ray.address` (a cluster, or the one `ray job submit` runs us in), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
             include_dashboard=False if address is None else None, ignore_reinit_error=True)
