"""The MLflow model registry: register an evaluated checkpoint as `challenger`, promote it to `champion`
only if it beats the champion on the same eval set.

A registered version is a PyTorch model with a video pyfunc (the flavor in `tracking`). Its tags hold what the
gate needs: the eval set's identity and the figures on it (`slowfast.eval.<set>.top1`, one per eval set
the version was scored on), the checkpoint it came from, and, after `promote`, the decision and both
figures. A champion scored on another eval set is re-evaluated on this one before the comparison.
"""

from __future__ import annotations

import time
from pathlib import Path

from slowfast.serving import ClipSpec

from . import tracking
from .checkpoints import LoadedModel, load_from_checkpoint
from .config import PipelineConfig
from .data import storage_of
from .errors import PipelineError
from .evaluate import EvalSet, eval_set, evaluate
from .tracking import CHALLENGER, CHAMPION, TAG


class RegistryError(PipelineError, RuntimeError):
    """A registry operation that cannot go ahead; says which model, version or alias and what to do."""


# --- register ----------------------------------------------------------------------------------------


def register(
    cfg: PipelineConfig, evaluation: dict, log=print, *, model: LoadedModel | None = None, es: EvalSet | None = None
) -> dict:
    """Log the evaluated checkpoint as a model in its training run, register it under mlflow.model_name
    and point `challenger` at it. Registering the same checkpoint again returns its existing version.
    `model` and `es`: the network evaluate scored and its eval set, when the caller holds them (the
    workflow does); otherwise they are loaded and listed here."""
    if evaluation["model_uri"].startswith(("models:/", "runs:/")):
        raise RegistryError(
            f"{evaluation['model_uri']} is registered already; promote it with "
            "`python -m pipelines promote --version N`"
        )
    name, c = cfg.mlflow.model_name, tracking.client(cfg)
    existing = _version_of_checkpoint(cfg, name, evaluation["model_uri"])
    if existing is not None:
        log(f"register: {evaluation['model_uri']} is already version {existing.version} of {name}")
        _record_eval(c, name, existing.version, evaluation)
        c.set_registered_model_alias(name, CHALLENGER, existing.version)
        return _version_summary(c, name, existing.version)
    store = storage_of(cfg)
    loaded = (
        model
        if model is not None and model.uri == evaluation["model_uri"]
        else load_from_checkpoint(store, evaluation["model_uri"])
    )
    meta = (es or eval_set(cfg, store, log=lambda *_: None)).meta
    spec = ClipSpec(
        T=meta.T,
        tau=meta.tau,
        alpha=meta.alpha,
        target_fps=meta.target_fps,
        short_side=meta.short_side,
        crop=cfg.train.crop_size,
        temporal_views=cfg.evaluate.temporal_views,
        spatial_crops=cfg.evaluate.spatial_crops,
    )
    run_id = tracking.run_by_name(cfg, loaded.train_run) if loaded.train_run else None
    own_run = run_id is None  # a checkpoint from elsewhere: its own run in the experiment, closed after
    if own_run:
        run_id = c.create_run(
            tracking.experiment_id(cfg, log=log),
            run_name=f"register {Path(evaluation['model_uri']).name}",
            tags={f"{TAG}checkpoint": evaluation["model_uri"]},
        ).info.run_id
    tags = {
        f"{TAG}checkpoint": evaluation["model_uri"],
        f"{TAG}eval_set": evaluation["eval_set"],
        f"{TAG}eval_top1": f"{evaluation['top1']:.6f}",
        f"{TAG}eval_top5": f"{evaluation['top5']:.6f}",
        f"{TAG}preset": cfg.model.preset,
        f"{TAG}git_commit": tracking.git_commit(),
        f"{TAG}pipeline": cfg.name,
        _eval_key(evaluation["eval_set"]): f"{evaluation['top1']:.6f}",
    }
    version = tracking.log_model(
        cfg,
        run_id,
        net=loaded.net,
        class_names=loaded.class_names,
        spec=spec,
        metadata={
            "pipeline": cfg.name,
            "checkpoint": evaluation["model_uri"],
            "eval_set": evaluation["eval_set"],
            "eval_top1": evaluation["top1"],
        },
    )
    if own_run:
        tracking.close_run(cfg, run_id)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    c.set_registered_model_alias(name, CHALLENGER, version)
    log(f"register: {name} version {version} (alias {CHALLENGER}) from {evaluation['model_uri']}")
    return _version_summary(c, name, version)


def _version_of_checkpoint(cfg: PipelineConfig, name: str, checkpoint: str):
    same = [v for v in tracking.model_versions(cfg, name) if v.tags.get(f"{TAG}checkpoint") == checkpoint]
    return min(same, key=lambda v: int(v.version)) if same else None


def _eval_key(eval_set: str) -> str:
    return f"{TAG}eval.{eval_set[:16]}.top1"


def _record_eval(c, name: str, version: str, evaluation: dict) -> None:
    c.set_model_version_tag(name, version, _eval_key(evaluation["eval_set"]), f"{evaluation['top1']:.6f}")


def _version_summary(c, name: str, version: str) -> dict:
    mv = c.get_model_version(name, version)
    return {
        "model_name": name,
        "model_version": int(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "aliases": sorted(mv.aliases),
        "tags": dict(mv.tags),
        "run_id": mv.run_id,
    }


# --- promote -----------------------------------------------------------------------------------------


def promote(cfg: PipelineConfig, version: int | str | None = None, log=print, es: EvalSet | None = None) -> dict:
    """Make `version` (default: the challenger) champion if its top-1 on this config's eval set (`es`, listed
    once here when not given) beats the champion's (as the champion is when the decision is written) by
    mlflow.promote_margin; the first model becomes champion. Both figures and the decision are written as
    tags on the version."""
    name, c, margin = cfg.mlflow.model_name, tracking.client(cfg), cfg.mlflow.promote_margin
    try:
        mv = tracking.model_version(cfg, name, version)
    except tracking.TrackingError as exc:
        raise RegistryError(str(exc)) from None
    version = mv.version
    es = es or eval_set(cfg, storage_of(cfg), log=lambda *_: None)
    mine = _score_on(cfg, c, name, mv, es, log)
    for _ in range(5):  # optimistic: redo the comparison if another run moved the champion meanwhile
        champ = tracking.version_by_alias(cfg, name, CHAMPION)
        if champ is not None and champ.version == version:
            decision, reason, theirs = "promoted", "already champion", mine
        elif champ is None:
            decision, reason, theirs = "promoted", "first model: no champion yet", None
        else:
            theirs = _score_on(cfg, c, name, champ, es, log)
            better = mine > theirs + margin
            decision = "promoted" if better else "rejected"
            reason = (
                f"top-1 {mine:.4f} {'>' if better else '<='} champion v{champ.version} {theirs:.4f} + margin {margin:g}"
            )
        now = tracking.version_by_alias(cfg, name, CHAMPION)
        if (now.version if now else None) != (champ.version if champ else None):
            continue
        if decision == "promoted" and reason != "already champion":
            c.set_registered_model_alias(name, CHAMPION, version)
        break
    else:
        raise RegistryError(
            f"{name}: the champion kept changing while version {version} was being compared; "
            "run `python -m pipelines promote` again"
        )
    tags = {
        "decision": decision,
        "reason": reason,
        "top1": f"{mine:.6f}",
        "eval_set": es.identity,
        "champion_version": champ.version if champ else "",
        "champion_top1": "" if theirs is None or champ is None else f"{theirs:.6f}",
        "margin": f"{margin:g}",
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for k, v in tags.items():
        c.set_model_version_tag(name, version, f"{TAG}promotion.{k}", str(v))
    log(f"promote: {name} v{version}: {decision} ({reason})")
    out = _version_summary(c, name, version)
    out.update(
        promoted=decision == "promoted",
        decision=decision,
        reason=reason,
        top1=mine,
        champion_before=int(champ.version) if champ else None,
        champion_top1=theirs,
    )
    return out


def _score_on(cfg: PipelineConfig, c, name: str, mv, es: EvalSet, log) -> float:
    """The version's top-1 on this eval set: from its tags, or evaluated now (and recorded)."""
    known = mv.tags.get(_eval_key(es.identity))
    if known is not None:
        return float(known)
    log(f"promote: {name} v{mv.version} has no figure on this eval set; evaluating it")
    result = evaluate(cfg, f"models:/{name}/{mv.version}", log=log, es=es)
    _record_eval(c, name, mv.version, result)
    return result["top1"]
