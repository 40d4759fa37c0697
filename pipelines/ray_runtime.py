"""Starting or joining Ray: one place, so every step sees the same cluster, and the user sees the
pipeline's own progress lines and Ray's warnings, not Ray's INFO logs (`--verbose` shows those too)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from .config import PipelineConfig
from .errors import PipelineError

# Read by every Ray process as it starts: Ray Data's INFO lines (dataset plans, and progress logged
# line by line when stderr is not a terminal; progress bars on a terminal are unaffected), and MLflow's
# in the train workers (system metrics' start-up lines); on a cluster the workers get them from the
# job's runtime env, not from the driver's environment.
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "MLFLOW_LOGGING_LEVEL": "WARNING"}

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


def _not_token_auth_on(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def ray_address(cfg: PipelineConfig) -> str:
    """What `init_ray` joins: `ray.address`, else the cluster `ray job submit` runs us in (RAY_ADDRESS),
    else "local" (a private local Ray)."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"


def joins_cluster(cfg: PipelineConfig) -> bool:
    """Whether `init_ray` joins a running cluster (which may span nodes) rather than starting a private
    local Ray (one node, by construction)."""
    return ray_address(cfg) != "local"


def init_ray(cfg: PipelineConfig, shared: dict[str, str] | None = None, dashboard: bool = True) -> None:
    """Join `ray.address` (a cluster; "auto" finds one started with `ray start` on this machine), or the
    cluster `ray job submit` runs us in (RAY_ADDRESS), else start a private local Ray: never join some
    other cluster that happens to run on this machine by accident.

    shared: {what: path} that Ray's workers read or write (default: storage_root and data.video_root);
    on a cluster of more than one node a local one must be a shared filesystem (`check_shared_paths`).
    dashboard=False: a private local Ray runs no dashboard (nor the State API it serves, which Ray Train
    needs): for work that uses neither, on a machine where its share of a core counts.
    """
    import ray
    from ray.data import DataContext

    # Read when a dataset is built: a step whose Ray Data work stalls stops instead of hanging.
    DataContext.get_current().execution_no_progress_timeout_s = cfg.ray.data_wait_timeout_s
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    env, runtime_env, local = {}, {}, {}
    if not _verbose:
        env = {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}  # a value the user exported wins
        # The driver and a local Ray's processes inherit the environment; a cluster's workers get the
        # job's runtime env. Ray Data configured the driver's logger when it was imported.
        os.environ.update(env)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # A new local Ray says that it turned token authentication on, as Ray 2.60 does by default: a notice,
        # not a problem (the warning that it is off stays).
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_token_auth_on)
        runtime_env["worker_process_setup_hook"] = quiet_worker
    if address == "local" and not dashboard:
        local = dict(include_dashboard=False)
    elif address == "local":
        # Ray Train's placement-group cleaner asks the State API about its controller without an
        # address; Ray then looks for the instance among the processes on this machine, and with two
        # of them the lookup fails and prints a traceback. So: the dashboard, which serves the State
        # API (include_dashboard=False leaves it out), on a known port, and every worker its address.
        port = _free_port()
        local = dict(include_dashboard=None, dashboard_host="127.0.0.1", dashboard_port=port)
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if env:
        runtime_env["env_vars"] = env
    ray.init(
        address=address,
        logging_level=logging.INFO if _verbose else logging.WARNING,
        log_to_driver=True,
        runtime_env=runtime_env or None,
        ignore_reinit_error=True,
        **local,
    )
    if address != "local":
        try:
            check_shared_paths(
                cfg,
                shared
                if shared is not None
                else {"storage_root": cfg.storage_root, "data.video_root": cfg.data.video_root},
            )
        except BaseException:
            ray.shutdown()
            raise


class SharedStorageError(PipelineError):
    """A local path that the nodes of a multi-node cluster would each see on their own disk."""


def check_shared_paths(cfg: PipelineConfig, paths: dict[str, str]) -> None:
    """Refuse local paths on a cluster of more than one node (or whose head runs no work, so that every
    task lands on another node) unless `shared_filesystem` says every node mounts them: shards,
    checkpoints and manifests would be scattered over the nodes' own disks."""
    import ray

    local = {k: v for k, v in paths.items() if v and "://" not in v}
    if not local or cfg.shared_filesystem:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    head_idle = any(n["NodeID"] == here and not n.get("Resources", {}).get("CPU") for n in nodes)
    if len(nodes) <= 1 and not head_idle:
        return
    where = f"{len(nodes)} nodes" if len(nodes) > 1 else "a head node that runs no tasks (0 CPUs)"
    listed = ", ".join(f"{k} {v!r}" for k, v in local.items())
    raise SharedStorageError(
        f"{listed}: a local path, and this Ray cluster has {where}: each node would read and write its own "
        "disk (shards, checkpoints and manifests scattered, videos missing). Use an s3:// location "
        "(--set storage_root=s3://BUCKET/PREFIX), or, if every node mounts this path at the same place (NFS, EFS, "
        "Lustre), say so with --set shared_filesystem=true"
    )


def data_nodes(cfg: PipelineConfig) -> dict:
    """Ray remote args that keep Ray Data's decoding and transforms on the data nodes (ray.data_nodes)."""
    return {"label_selector": dict(cfg.ray.data_nodes)} if cfg.ray.data_nodes else {}


def train_nodes(cfg: PipelineConfig) -> dict:
    """Ray remote args that keep train workers and scoring actors on the train nodes (ray.train_nodes)."""
    return {"label_selector": dict(cfg.ray.train_nodes)} if cfg.ray.train_nodes else {}


def stalled(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it, through Ray's wrappers) is Ray Data's no-progress timeout."""
    from ray.data.exceptions import ExecutionTimeoutError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ExecutionTimeoutError) or type(exc).__name__ == "ExecutionTimeoutError":
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
    return False


@contextlib.contextmanager
def stops_when_stalled(cfg: PipelineConfig, what: str, error: type[PipelineError]):
    """Around the consumption of a Ray Data stream: its no-progress timeout becomes `error`, saying what
    `what` (e.g. "preprocess's decode actors") waited for."""
    try:
        yield
    except Exception as exc:
        if stalled(exc):
            raise error(waiting_for(cfg, what)) from None
        raise


def waiting_for(cfg: PipelineConfig, what: str, train_cpus: float | None = None) -> str:
    """The end of a stall's message: what Ray Data waited for, what the cluster has (and, train_cpus, what the
    train workers held while it waited), and what to do."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    roles = f" on nodes labelled {cfg.ray.data_nodes}" if cfg.ray.data_nodes else ""
    held = (
        f"the train workers held {train_cpus:g} of them"
        if train_cpus is not None
        else f"{free.get('CPU', 0):g} free now"
    )
    return (
        f"Ray Data made no progress for {cfg.ray.data_wait_timeout_s:g} s (ray.data_wait_timeout_s): {what} "
        f"wait for CPUs{roles}; the cluster has {len(nodes)} node(s) with {total.get('CPU', 0):g} CPU(s) in all, "
        f"{held}. Add a node (or let the autoscaler add one), or free CPUs "
        "(fewer train.num_workers or train.cpus_per_worker), then run the same command again: it resumes "
        "where it stopped."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
