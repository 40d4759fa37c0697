"""`pipelines run`: ingest -> preprocess -> train -> evaluate -> register as one resumable workflow.

A thin runner: each step is idempotent on its own committed outputs (committed videos are not decoded
again, a finished training run is not trained again and an interrupted one resumes from its last
checkpoint, an evaluation already written is read back, a checkpoint already registered keeps its
version and its promotion decision), so a step with nothing new to do is skipped, and re-running the
same command after a crash resumes at the step that was interrupted. Ray does the distributed work
inside the steps.

Every invocation gets its own run id; its records go to storage_root/runs/<run-id>/: run.json (config
hash, status, heartbeat), <step>.json per step (status, config hash, inputs, outputs, timings) and
summary.json at the end. `python -m pipelines status` reads them back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from .config import PipelineConfig
from .data import storage_of
from .errors import PipelineError
from .ray_runtime import init_ray, joins_cluster
from .storage import Storage

STEPS = ("ingest", "preprocess", "train", "evaluate", "register")
# The config sections each step's output depends on (its config hash).
STEP_SECTIONS = {
    "ingest": ("data",),
    "preprocess": ("data", "preprocess", "model"),
    "train": ("data", "preprocess", "model", "train"),
    "evaluate": ("data", "preprocess", "model", "train", "evaluate"),
    "register": ("data", "preprocess", "model", "train", "evaluate", "mlflow"),
}
HEARTBEAT_S = 30.0  # run.json's heartbeat; a "running" run silent for 4 beats was interrupted


class WorkflowError(PipelineError, RuntimeError):
    """A workflow that cannot go on: says which step and what to run instead."""


@dataclass
class Context:
    """What the steps hand each other within one invocation."""

    cfg: PipelineConfig
    store: Storage
    run_id: str
    log: Callable[[str], None]
    force: set[str] = field(default_factory=set)
    plan: object = None
    preprocessed: dict | None = None
    trained: dict | None = None
    eval_set: object = None  # evaluate.EvalSet: listed once, used by evaluate and the promotion gate
    model: object = None  # checkpoints.LoadedModel: the network evaluate scored, registered as it is
    evaluation: dict | None = None
    registered: dict | None = None
    init_weights: tuple | None = None  # train.init_from's checkpoint, read and checked before any step


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def select_steps(from_step: str | None = None, only: str | None = None) -> list[str]:
    if from_step and only:
        raise WorkflowError("--from and --only exclude each other")
    if only:
        return [only]
    return list(STEPS[STEPS.index(from_step) :]) if from_step else list(STEPS)


class Recorder:
    """storage_root/runs/<run-id>/: run.json with a heartbeat, one JSON record per step."""

    def __init__(self, store: Storage, cfg: PipelineConfig, run_id: str, steps: list[str]):
        self.store, self.cfg, self.run_id = store, cfg, run_id
        self.run = {
            "run_id": run_id,
            "pipeline": cfg.name,
            "config_hash": cfg.config_hash(),
            "steps": steps,
            "status": "running",
            "started": _now(),
            "started_ts": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": _now(),
        }
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def start(self) -> None:
        self._write("run.json", self.run)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.run["heartbeat"] = _now()
            self._write("run.json", self.run)

    def finish(self, status: str, summary: dict | None = None) -> None:
        self._stop.set()
        self.run.update(status=status, ended=_now(), heartbeat=_now())
        if summary is not None:
            self._write("summary.json", summary)
        self._write("run.json", self.run)

    def step(self, name: str, record: dict) -> None:
        self._write(f"{name}.json", record)

    def _write(self, name: str, data: dict) -> None:
        self.store.write_bytes(f"runs/{self.run_id}/{name}", json.dumps(data, indent=1, default=str).encode())


def run(
    cfg: PipelineConfig,
    *,
    from_step: str | None = None,
    only: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    log=print,
) -> dict:
    """Run the workflow's steps in order; returns the summary (also in runs/<run-id>/summary.json)."""
    steps = select_steps(from_step, only)
    unknown = sorted(set(force) - set(STEPS))
    if unknown:
        raise WorkflowError(f"--force {', '.join(unknown)}: not a step; steps are {', '.join(STEPS)}")
    if joins_cluster(cfg) and set(steps) & {"preprocess", "train", "evaluate"}:
        init_ray(cfg)  # on a cluster, a local storage_root its nodes do not share stops the run here
    store = storage_of(cfg)
    store.check_writable()
    ctx = Context(cfg, store, new_run_id(), log, force=set(force))
    rec = Recorder(store, cfg, ctx.run_id, steps)
    rec.start()
    log(f"run {ctx.run_id}: {' -> '.join(steps)} (records: {store.uri('runs', ctx.run_id)})")
    if "train" in steps:
        from .train import check_init_from

        try:  # a checkpoint that does not fit stops the run before ingest decodes anything
            ctx.init_weights = check_init_from(cfg, store, log)
        except BaseException:
            rec.finish("failed")
            raise
    statuses: dict[str, dict] = {}
    try:
        for name in STEPS:
            if name not in steps:
                continue
            started = time.time()
            record = {
                "step": name,
                "run_id": ctx.run_id,
                "status": "running",
                "started": _now(),
                "config_hash": cfg.config_hash(*STEP_SECTIONS[name]),
                "forced": name in ctx.force,
            }
            rec.step(name, record)
            log(f"step {name}")
            try:
                status, inputs, outputs = STEP_FUNCTIONS[name](ctx)
            except BaseException as exc:
                record.update(
                    status="failed",
                    error=f"{type(exc).__name__}: {exc}",
                    ended=_now(),
                    wall_s=round(time.time() - started, 1),
                )
                rec.step(name, record)
                raise
            record.update(
                status=status, inputs=inputs, outputs=outputs, ended=_now(), wall_s=round(time.time() - started, 1)
            )
            rec.step(name, record)
            statuses[name] = {"status": status, "wall_s": record["wall_s"]}
            log(f"step {name}: {status} in {record['wall_s']}s")
    except BaseException:
        rec.finish("failed")
        raise
    summary = make_summary(ctx, statuses)
    rec.finish("succeeded", summary)
    return summary


def make_summary(ctx: Context, statuses: dict[str, dict]) -> dict:
    reg = ctx.registered or {}
    ev = ctx.evaluation or {}
    return {
        "run_id": ctx.run_id,
        "pipeline": ctx.cfg.name,
        "config_hash": ctx.cfg.config_hash(),
        "model_name": ctx.cfg.mlflow.model_name,
        "model_version": reg.get("model_version"),
        "model_uri": reg.get("model_uri"),
        "aliases": reg.get("aliases", []),
        "promoted": bool(reg.get("promoted")),
        "decision": reg.get("decision"),
        "reason": reg.get("reason"),
        "metrics": {
            "top1": ev.get("top1"),
            "top5": ev.get("top5"),
            "mean_class_accuracy": ev.get("mean_class_accuracy"),
            "num_videos": ev.get("num_videos"),
        },
        "checkpoint": (ctx.trained or {}).get("best_checkpoint"),
        "tracking_uri": (ctx.trained or {}).get("tracking_uri"),
        "steps": statuses,
        "records": ctx.store.uri("runs", ctx.run_id),
    }


# --- the steps: each returns (status, inputs, outputs) -----------------------------------------------


def step_ingest(ctx: Context):
    from .data import run_ingest

    ctx.plan = run_ingest(ctx.cfg, ctx.log)
    splits = {s: sp.summary() for s, sp in ctx.plan.splits.items()}
    todo = sum(len(sp.todo) for sp in ctx.plan.splits.values())
    inputs = {
        "format": ctx.cfg.data.format,
        "annotations": dict(ctx.cfg.data.annotations),
        "video_root": ctx.cfg.data.video_root,
    }
    summary = ctx.plan.summary()
    return (
        "done",
        inputs,
        {
            "classes": len(ctx.plan.classes),
            "to_decode": todo,
            "splits": splits,
            "layout": ctx.plan.layout,
            "ignored": summary.get("ignored", {}),
        },
    )


def step_preprocess(ctx: Context):
    from .data import run_preprocess

    if ctx.plan is None:
        from .data import run_ingest

        ctx.plan = run_ingest(ctx.cfg, ctx.log)
    if "preprocess" in ctx.force:
        ctx.log(
            "preprocess: --force has no effect on committed videos (they are decoded once per preprocessing "
            "config); change preprocess.seed or another preprocess key to decode everything again"
        )
    todo = sum(len(sp.todo) for sp in ctx.plan.splits.values())
    ctx.preprocessed = run_preprocess(
        ctx.cfg, [ctx.cfg.data.train_split, ctx.cfg.data.val_split], run_id=ctx.run_id, log=ctx.log, plan=ctx.plan
    )
    splits = {
        s: {k: v for k, v in o.items() if k not in ("quarantine_reasons",)} | {"reasons": o["quarantine_reasons"]}
        for s, o in ctx.preprocessed["splits"].items()
    }
    decoded = sum(o["decoded_now"] for o in ctx.preprocessed["splits"].values())
    inputs = {"to_decode": todo, "prep_hashes": {s: o["prep_hash"] for s, o in ctx.preprocessed["splits"].items()}}
    return ("done" if decoded else "skipped"), inputs, {"decoded_now": decoded, "splits": splits}


def _preprocessed(ctx: Context) -> dict:
    """The preprocess step's result; when the workflow starts later (--from/--only), a no-op re-run of it
    (it only lists what is committed, and decodes anything new)."""
    if ctx.preprocessed is None:
        ctx.log("(preprocess not in this run: checking the committed shards)")
        step_preprocess(ctx)
    return ctx.preprocessed


def step_train(ctx: Context):
    from .train import train

    run_name = f"{ctx.cfg.name}-{ctx.run_id}" if "train" in ctx.force else None
    ctx.trained = train(
        ctx.cfg, run_name=run_name, log=ctx.log, preprocessed=_preprocessed(ctx), init_weights=ctx.init_weights
    )
    t = ctx.trained
    status = "done" if t["epochs_run_now"] else "skipped"
    outputs = {
        k: t[k]
        for k in (
            "run_name",
            "epochs_done",
            "epochs_run_now",
            "resumed_from_epoch",
            "best_checkpoint",
            "best_val_top1",
            "run_dir",
            "mlflow_run_id",
            "tracking_uri",
            "wall_s",
        )
    }
    return status, {"run_name": t["run_name"]}, outputs


def _trained(ctx: Context) -> dict:
    if ctx.trained is None:
        ctx.log("(train not in this run: looking up the finished training run)")
        step_train(ctx)
    return ctx.trained


def step_evaluate(ctx: Context):
    from .checkpoints import load_from_checkpoint
    from .evaluate import eval_set, evaluate, recorded

    checkpoint = _trained(ctx)["best_checkpoint"]
    if checkpoint is None:
        raise WorkflowError("evaluate: the training run has no checkpoint; run the train step first")
    es = ctx.eval_set = eval_set(ctx.cfg, ctx.store, ctx.log, preprocessed=_preprocessed(ctx))
    done = None if "evaluate" in ctx.force else recorded(ctx.cfg, checkpoint, es)
    if done is not None:
        ctx.log(f"evaluate: {checkpoint} on this eval set: top-1 {done['top1']:.3f} (recorded {done['artifacts']})")
        ctx.evaluation = done
    else:
        ctx.model = load_from_checkpoint(ctx.store, checkpoint)
        ctx.evaluation = evaluate(ctx.cfg, checkpoint, ctx.log, es=es, model=ctx.model)
    ev = ctx.evaluation
    outputs = {
        k: ev[k]
        for k in ("top1", "top5", "mean_class_accuracy", "num_videos", "views_per_video", "artifacts", "eval_set")
    }
    return ("skipped" if done is not None else "done"), {"checkpoint": checkpoint, "eval_set": es.identity}, outputs


def step_register(ctx: Context):
    from .registry import promote, register
    from .tracking import TAG

    if ctx.evaluation is None:
        ctx.log("(evaluate not in this run: reading its recorded result)")
        step_evaluate(ctx)
    reg = register(ctx.cfg, ctx.evaluation, ctx.log, model=ctx.model, es=ctx.eval_set)
    decided = reg["tags"].get(f"{TAG}promotion.decision")
    if decided and decided_on(reg, ctx.evaluation["eval_set"]) and "register" not in ctx.force:
        ctx.log(f"register: version {reg['model_version']} was already {decided} on this eval set")
        ctx.registered = {
            **reg,
            "promoted": decided == "promoted",
            "decision": decided,
            "reason": reg["tags"].get(f"{TAG}promotion.reason"),
        }
        status = "skipped"
    else:
        ctx.registered = {**reg, **promote(ctx.cfg, reg["model_version"], ctx.log, es=ctx.eval_set)}
        status = "done"
    r = ctx.registered
    outputs = {
        k: r.get(k)
        for k in (
            "model_name",
            "model_version",
            "model_uri",
            "aliases",
            "promoted",
            "decision",
            "reason",
            "champion_before",
            "champion_top1",
        )
    }
    return status, {"checkpoint": ctx.evaluation["model_uri"], "top1": ctx.evaluation["top1"]}, outputs


def decided_on(reg: dict, eval_set: str) -> bool:
    from .tracking import TAG

    return reg["tags"].get(f"{TAG}promotion.eval_set") == eval_set


STEP_FUNCTIONS = {
    "ingest": step_ingest,
    "preprocess": step_preprocess,
    "train": step_train,
    "evaluate": step_evaluate,
    "register": step_register,
}


# --- status ------------------------------------------------------------------------------------------


def list_runs(cfg: PipelineConfig) -> list[dict]:
    """Every run of this storage root, newest first, with its step records; a run whose heartbeat
    stopped without an end is marked interrupted."""
    store = storage_of(cfg)
    runs = []
    for path in store.list("runs", suffix="/run.json"):
        run_dir = path.rsplit("/", 1)[0]
        info = json.loads(store.read_bytes(path))
        if info.get("status") == "running" and _age(info.get("heartbeat")) > 4 * HEARTBEAT_S:
            info["status"] = "interrupted"
        info["step_records"] = {}
        for step in STEPS:
            if store.exists(f"{run_dir}/{step}.json"):
                info["step_records"][step] = json.loads(store.read_bytes(f"{run_dir}/{step}.json"))
        if store.exists(f"{run_dir}/summary.json"):
            info["summary"] = json.loads(store.read_bytes(f"{run_dir}/summary.json"))
        runs.append(info)
    return sorted(runs, key=lambda r: r.get("started_ts", 0.0), reverse=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _age(stamp: str | None) -> float:
    if not stamp:
        return float("inf")
    return time.time() - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
