"""Starting or joining Ray: one place, so every step sees the same cluster, and the user sees the
pipeline's own progress lines and Ray's warnings, not Ray's INFO logs (`--verbose` shows those too)."""
from __future__ import annotations

import logging
import os
import socket

from .config import PipelineConfig

# Read by every Ray process as it starts: Ray Data's INFO lines (dataset plans, and progress logged
# line by line when stderr is not a terminal; progress bars on a terminal are unaffected).
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}

_verbose = False


def set_verbose(verbose: bool) -> None:
    """`--verbose`: Ray (and MLflow) log at their defaults (INFO) from the next `init_ray` on."""
    global _verbose
    _verbose = verbose
    if not verbose:  # MLflow's own INFO lines (database set-up, skipped GPU metrics) too; read at its import
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def train_logging():
    """Ray Train's console level for `RunConfig(logging_config=...)`: its INFO lines (a full
    `TrainingReport(...)` per epoch, worker-group setup) only with `--verbose`."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if _verbose else "WARNING")


def quiet_worker() -> None:
    """Runs in every Ray worker process as it starts (the runtime env's worker_process_setup_hook)."""
    import ray

    # Ray Train 2.60 logs every report, a full `TrainingReport(...)` with all metrics, under a logger
    # named after its source file, outside "ray.train", where RunConfig's logging level does not reach.
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def init_ray(cfg: PipelineConfig) -> None:
    """Join `ray.address` (a cluster; "auto" finds one started with `ray start` on this machine), or the
    cluster `ray job submit` runs us in (RAY_ADDRESS), else start a private local Ray: never join some
    other cluster that happens to run on this machine by accident."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    env, runtime_env, local = {}, {}, {}
    if not _verbose:
        env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}  # a value the user exported wins
        # The driver and a local Ray's processes inherit the environment; a cluster's workers get the
        # job's runtime env. Ray Data configured the driver's logger when it was imported.
        os.environ.update(env)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        runtime_env["worker_process_setup_hook"] = quiet_worker
    if address == "local":
        # Ray Train's placement-group cleaner asks the State API about its controller without an
        # address; Ray then looks for the instance among the processes on this machine, and with two
        # of them the lookup fails and prints a traceback. So: the dashboard, which serves the State
        # API (include_dashboard=False leaves it out), on a known port, and every worker its address.
        port = _free_port()
        local = dict(include_dashboard=None, dashboard_host="127.0.0.1", dashboard_port=port)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if env:
        runtime_env["env_vars"] = env
    ray.init(address=address, logging_level=logging.INFO if _verbose else logging.WARNING, log_to_driver=True,
             runtime_env=runtime_env or None, ignore_reinit_error=True, **local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
