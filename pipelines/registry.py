"""The MLflow model registry: register an evaluated checkpoint as `challenger`, promote it to `champion`
only if it beats the champion on the same eval set.

A registered version is a PyTorch model with a video pyfunc (slowfast.serving). Its tags hold what the
gate needs: the eval set's identity and the figures on it (`slowfast.eval.<set>.top1`, one per eval set
the version was scored on), the checkpoint it came from, and, after `promote`, the decision and both
figures. A champion scored on another eval set is re-evaluated on this one before the comparison.
"""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from .config import PipelineConfig
from .errors import PipelineError

CHALLENGER, CHAMPION = "challenger", "champion"
TAG = "slowfast."


class RegistryError(PipelineError, RuntimeError):
    """A registry operation that cannot go ahead; says which model, version or alias and what to do."""


def tracking_uri(cfg: PipelineConfig) -> str:
    from .train import absolute_tracking_uri

    return absolute_tracking_uri(cfg.mlflow.tracking_uri)


def client(cfg: PipelineConfig):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def use_tracking(cfg: PipelineConfig):
    """mlflow's module-level calls (load_model, Model.log) go to the config's server inside; the registry
    follows the tracking URI (unless MLFLOW_REGISTRY_URI says otherwise)."""
    import mlflow

    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)


def train_run_id(cfg: PipelineConfig, run_name: str) -> str | None:
    """The MLflow run that `pipelines train` opened for this training run name."""
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`slowfast.run_name` = '{run_name}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def describe_missing(cfg: PipelineConfig, uri: str, exc: Exception) -> str:
    """A clear message for a models:/ URI that does not resolve: what exists instead."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = uri[len("models:/"):].split("@")[0].split("/")[0] if uri.startswith("models:/") else None
    known = [m.name for m in c.search_registered_models(max_results=50)]
    if name and name not in known:
        return (f"{uri}: no registered model {name!r} in {tracking_uri(cfg)} (registered: "
                f"{', '.join(known) or 'none'}); run `python -m pipelines run --config ...` to train and register "
                "one, or check mlflow.tracking_uri")
    if name:
        try:
            aliases = sorted(c.get_registered_model(name).aliases)
        except MlflowException:
            aliases = []
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
        return (f"{uri}: not found in {tracking_uri(cfg)}: model {name!r} has versions {versions or 'none'} and "
                f"aliases {aliases or 'none'} ({exc.message if hasattr(exc, 'message') else exc})")
    return f"{uri}: cannot load ({exc})"


def git_commit() -> str:
    """The source checkout's commit (with -dirty), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def example_video() -> bytes:
    """A one-second synthetic clip, encoded: the logged model's input example (works anywhere)."""
    import tempfile

    from slowfast.video.synth import encode_video, render, sample_video

    with tempfile.TemporaryDirectory() as tmp:
        path = encode_video(Path(tmp) / "example.mp4", render(sample_video(0, 0, 0, width=96, height=72, seconds=1.2)))
        return path.read_bytes()


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "av", "numpy", "pydantic", "pandas", "mlflow")]


# --- register ----------------------------------------------------------------------------------------


def register(cfg: PipelineConfig, evaluation: dict, log=print) -> dict:
    """Log the evaluated checkpoint as a model in its training run, register it under mlflow.model_name
    and point `challenger` at it. Registering the same checkpoint again returns its existing version."""
    from mlflow.models import Model

    from slowfast import serving

    from .data import storage_of
    from .evaluate import _from_checkpoint, eval_set

    if evaluation["model_uri"].startswith(("models:/", "runs:/")):
        raise RegistryError(f"{evaluation['model_uri']} is registered already; promote it with "
                            "`python -m pipelines promote --version N`")
    name, c = cfg.mlflow.model_name, client(cfg)
    existing = _version_of_checkpoint(c, name, evaluation["model_uri"])
    if existing is not None:
        log(f"register: {evaluation['model_uri']} is already version {existing.version} of {name}")
        _record_eval(c, name, existing.version, evaluation)
        c.set_registered_model_alias(name, CHALLENGER, existing.version)
        return _version_summary(c, name, existing.version)
    store = storage_of(cfg)
    loaded = _from_checkpoint(store, evaluation["model_uri"])
    meta = eval_set(cfg, store, log=lambda *_: None).meta
    spec = serving.ClipSpec(T=meta.T, tau=meta.tau, alpha=meta.alpha, target_fps=meta.target_fps,
                            short_side=meta.short_side, crop=cfg.train.crop_size,
                            temporal_views=cfg.evaluate.temporal_views, spatial_crops=cfg.evaluate.spatial_crops)
    run_id = train_run_id(cfg, loaded.train_run) if loaded.train_run else None
    own_run = run_id is None  # a checkpoint from elsewhere: its own run in the experiment, closed after
    if own_run:
        exp = c.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(cfg.mlflow.experiment)
        run_id = c.create_run(exp_id, run_name=f"register {Path(evaluation['model_uri']).name}",
                              tags={f"{TAG}checkpoint": evaluation["model_uri"]}).info.run_id
    tags = {f"{TAG}checkpoint": evaluation["model_uri"], f"{TAG}eval_set": evaluation["eval_set"],
            f"{TAG}eval_top1": f"{evaluation['top1']:.6f}", f"{TAG}eval_top5": f"{evaluation['top5']:.6f}",
            f"{TAG}preset": cfg.model.preset, f"{TAG}git_commit": git_commit(), f"{TAG}pipeline": cfg.name,
            _eval_key(evaluation["eval_set"]): f"{evaluation['top1']:.6f}"}
    with use_tracking(cfg):
        info = Model.log(None, flavor=serving, name="model", run_id=run_id, registered_model_name=name,
                         pytorch_model=loaded.net, class_names=loaded.class_names, spec=spec,
                         input_example=example_video(), pip_requirements=_requirements(),
                         metadata={"pipeline": cfg.name, "checkpoint": evaluation["model_uri"],
                                   "eval_set": evaluation["eval_set"], "eval_top1": evaluation["top1"]})
    if own_run:
        c.set_terminated(run_id, "FINISHED")
    version = str(info.registered_model_version)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    c.set_registered_model_alias(name, CHALLENGER, version)
    log(f"register: {name} version {version} (alias {CHALLENGER}) from {evaluation['model_uri']}")
    return _version_summary(c, name, version)


def _version_of_checkpoint(c, name: str, checkpoint: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if v.tags.get(f"{TAG}checkpoint") == checkpoint]
    return min(same, key=lambda v: int(v.version)) if same else None


def _eval_key(eval_set: str) -> str:
    return f"{TAG}eval.{eval_set[:16]}.top1"


def _record_eval(c, name: str, version: str, evaluation: dict) -> None:
    c.set_model_version_tag(name, version, _eval_key(evaluation["eval_set"]), f"{evaluation['top1']:.6f}")


def _version_summary(c, name: str, version: str) -> dict:
    mv = c.get_model_version(name, version)
    return {"model_name": name, "model_version": int(mv.version), "model_uri": f"models:/{name}/{mv.version}",
            "aliases": sorted(mv.aliases), "tags": dict(mv.tags), "run_id": mv.run_id}


# --- promote -----------------------------------------------------------------------------------------


def promote(cfg: PipelineConfig, version: int | str | None = None, log=print) -> dict:
    """Make `version` (default: the challenger) champion if its top-1 on this config's eval set beats the
    champion's (as the champion is when the decision is written) by mlflow.promote_margin; the first
    model becomes champion. Both figures and the decision are written as tags on the version."""
    from mlflow.exceptions import MlflowException

    name, c, margin = cfg.mlflow.model_name, client(cfg), cfg.mlflow.promote_margin
    try:
        if version is None:
            mv = c.get_model_version_by_alias(name, CHALLENGER)
        else:
            mv = c.get_model_version(name, str(version))
    except MlflowException as exc:
        what = f"models:/{name}@{CHALLENGER}" if version is None else f"models:/{name}/{version}"
        raise RegistryError(describe_missing(cfg, what, exc)) from None
    version = mv.version
    eval_set_id = _current_eval_set(cfg)
    mine = _score_on(cfg, c, name, mv, eval_set_id, log)
    for _ in range(5):  # optimistic: redo the comparison if another run moved the champion meanwhile
        try:
            champ = c.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champ = None
        if champ is not None and champ.version == version:
            decision, reason, theirs = "promoted", "already champion", mine
        elif champ is None:
            decision, reason, theirs = "promoted", "first model: no champion yet", None
        else:
            theirs = _score_on(cfg, c, name, champ, eval_set_id, log)
            better = mine > theirs + margin
            decision = "promoted" if better else "rejected"
            reason = (f"top-1 {mine:.4f} {'>' if better else '<='} champion v{champ.version} {theirs:.4f} + margin "
                      f"{margin:g}")
        now = _champion_version(c, name)
        if now != (champ.version if champ else None):
            continue
        if decision == "promoted" and reason != "already champion":
            c.set_registered_model_alias(name, CHAMPION, version)
        break
    else:
        raise RegistryError(f"{name}: the champion kept changing while version {version} was being compared; "
                            "run `python -m pipelines promote` again")
    tags = {"decision": decision, "reason": reason, "top1": f"{mine:.6f}", "eval_set": eval_set_id,
            "champion_version": champ.version if champ else "", "champion_top1": "" if theirs is None or
            champ is None else f"{theirs:.6f}", "margin": f"{margin:g}", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, f"{TAG}promotion.{k}", str(v))
    log(f"promote: {name} v{version}: {decision} ({reason})")
    out = _version_summary(c, name, version)
    out.update(promoted=decision == "promoted", decision=decision, reason=reason, top1=mine,
               champion_before=int(champ.version) if champ else None, champion_top1=theirs)
    return out


def _champion_version(c, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        return None


def _current_eval_set(cfg: PipelineConfig) -> str:
    from .data import storage_of
    from .evaluate import eval_set

    return eval_set(cfg, storage_of(cfg), log=lambda *_: None).identity


def _score_on(cfg: PipelineConfig, c, name: str, mv, eval_set_id: str, log) -> float:
    """The version's top-1 on this eval set: from its tags, or evaluated now (and recorded)."""
    known = mv.tags.get(_eval_key(eval_set_id))
    if known is not None:
        return float(known)
    from .evaluate import evaluate

    log(f"promote: {name} v{mv.version} has no figure on this eval set; evaluating it")
    result = evaluate(cfg, f"models:/{name}/{mv.version}", log=log)
    _record_eval(c, name, mv.version, result)
    return result["top1"]
