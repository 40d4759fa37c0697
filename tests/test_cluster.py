"""cluster/ and the paper-recipe configs: Ray's own cluster schema, KubeRay manifests, runtime envs.

Nothing here starts a cluster; each check reads the files the way Ray, KubeRay or the pipeline will.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import re
import shlex
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.label_utils import (
    parse_node_labels_string,
    validate_label_selector,
    validate_node_label_syntax,
    validate_node_labels,
)
from ray._private.runtime_env import packaging
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pipelines.config import LR_REFERENCE_BATCH, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
RECIPES = {
    "configs/k400_slowfast_8x8_r50.yaml": "slowfast_8x8_r50",
    "configs/k400_slowfast_4x16_r50.yaml": "slowfast_4x16_r50",
}
# What a stock rayproject/ray image lacks (or must run at the tested version).
NEEDED = {"torch", "av", "simplejpeg", "mlflow", "boto3", "pydantic", "pyyaml"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def pip_pins(packages: list[str]) -> dict[str, str]:
    pins = {}
    for spec in packages:
        name, sep, version = spec.partition("==")
        assert sep and version, f"{spec!r}: pin an exact version (NAME==VERSION)"
        pins[canonical(name)] = version
    return pins


# --- cron --------------------------------------------------------------------------------------

CRON_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]


def parse_cron(schedule: str) -> list[set[int]]:
    """Standard 5-field cron -> the set of values of each field; ValueError when it does not parse."""
    fields = schedule.split()
    if len(fields) != 5:
        raise ValueError(f"{schedule!r}: {len(fields)} fields, a cron schedule has 5")
    out = []
    for text, (what, low, high) in zip(fields, CRON_FIELDS, strict=True):
        values = set()
        for part in text.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                raise ValueError(f"{schedule!r}: {what} {part!r} does not parse")
            a, b = (low, high) if m.group(1) == "*" else (int(m.group(2)), int(m.group(3) or m.group(2)))
            step = int(m.group(4) or 1)
            if not (low <= a <= b <= high) or step < 1:
                raise ValueError(f"{schedule!r}: {what} {part!r} is outside {low}-{high}")
            values.update(range(a, b + 1, step))
        out.append(values)
    return out


def shortest_period_s(schedule: str) -> int:
    """Shortest time between two starts, for the daily and weekly shapes the manifests use."""
    minute, hour, dom, month, dow = parse_cron(schedule)
    everything = [set(range(lo, hi + 1)) for _, lo, hi in CRON_FIELDS]
    assert dom == everything[2] and month == everything[3], f"{schedule}: only daily/weekly shapes are handled"
    assert len(minute) == 1 and len(hour) == 1, f"{schedule}: one start time per day expected"
    days = sorted({d % 7 for d in dow})
    gaps = [(b - a) % 7 or 7 for a, b in zip(days, days[1:] + days[:1], strict=True)]
    return min(gaps) * 86400


def test_cron_parser_rejects_what_cron_rejects():
    assert parse_cron("0 3 * * 0")[4] == {0}
    assert parse_cron("*/15 1-5 * * 1,3")[0] == {0, 15, 30, 45}
    for bad in ("0 3 * *", "60 3 * * 0", "0 24 * * *", "0 3 0 * *", "0 3 * * mon-fri", "@weekly"):
        with pytest.raises(ValueError):
            parse_cron(bad)
    assert shortest_period_s("0 3 * * 0") == 7 * 86400
    assert shortest_period_s("30 2 * * *") == 86400


# --- AWS cluster launcher ----------------------------------------------------------------------


def aws_config() -> dict:
    return load(CLUSTER / "aws.yaml")


def test_aws_config_passes_rays_own_validation():
    # What `ray up` does before it touches AWS: fill Ray's AWS defaults, then validate against
    # ray/autoscaler/ray-schema.json plus Ray's cross-field checks.
    prepared = prepare_config(copy.deepcopy(aws_config()))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    # Explicitly empty: Ray's AWS defaults must not slip their own head setup command in.
    assert prepared["head_setup_commands"] == prepared["setup_commands"]


def test_rays_validation_catches_a_misspelt_key():
    bad = copy.deepcopy(aws_config())
    bad["available_node_types"]["gpu_1x_a10g"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_aws_cluster_can_run_the_paper_recipe():
    cfg = aws_config()
    recipe = load_config(REPO / "configs/k400_slowfast_8x8_r50.yaml")
    t = recipe.train
    most_workers = most(t.num_workers)
    assert cfg["docker"]["image"] == RAY_IMAGE
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "IamInstanceProfile" not in head["node_config"]
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert {v["node_config"]["InstanceType"] for v in gpu_types.values()} == {"g5.xlarge", "g5.12xlarge"}
    for name, node in gpu_types.items():
        gpus, cpus = node["resources"]["GPU"], node["resources"]["CPU"]
        assert node.get("min_workers", 0) == 0, f"{name}: GPU nodes must scale from zero"
        assert cpus >= gpus * t.cpus_per_worker, f"{name}: no room for the train workers' CPUs"
        assert cpus >= gpus * recipe.infer.cpus_per_worker, f"{name}: no room for the scoring actors' CPUs"
        assert math.ceil(most_workers / gpus) <= node["max_workers"], f"{name}: cannot host {most_workers} workers"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    # Each role has the room it is asked for, on its own nodes: the train workers' CPUs on the GPU
    # nodes, Ray Data's decode budget on the data nodes (test_aws_node_types_carry_the_recipes_roles).
    data_types = {k: v for k, v in workers.items() if not v["resources"].get("GPU", 0)}
    assert data_types, "no CPU node type for the data role"
    assert sum(v["max_workers"] * v["resources"]["CPU"] for v in data_types.values()) >= recipe.ray.data_cpus
    assert all(v["resources"]["CPU"] >= recipe.infer.decode_cpus for v in data_types.values())
    assert sum(v["max_workers"] for v in workers.values()) <= cfg["max_workers"]
    for name, node in workers.items():
        # S3 through an instance profile, by name; never keys.
        assert set(node["node_config"]["IamInstanceProfile"]) == {"Name"}, name
    assert any(c.startswith("pip install") and "constraints.txt" in c for c in cfg["setup_commands"])
    for cmd in cfg["head_start_ray_commands"][-1:] + cfg["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in cmd


# --- node roles --------------------------------------------------------------------------------
# The recipes' ray.train_nodes / ray.data_nodes are label selectors; the cluster files put the labels
# on the nodes. GPU node types and groups take the train role, CPU ones the data role, the head none.


def most(num_workers) -> int:
    """train.num_workers, or the max of an elastic [min, max]."""
    return num_workers if isinstance(num_workers, int) else max(num_workers)


def roles() -> tuple[dict[str, str], dict[str, str]]:
    """(train, data): the node labels both recipes ask for."""
    asked = {
        (tuple(sorted(c.ray.train_nodes.items())), tuple(sorted(c.ray.data_nodes.items())))
        for c in (load_config(REPO / p) for p in RECIPES)
    }
    assert len(asked) == 1, f"the recipes ask for different node roles: {asked}"
    train, data = asked.pop()
    return dict(train), dict(data)


def role_of(gpus: float) -> dict[str, str]:
    train, data = roles()
    return train if gpus > 0 else data


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector with plain values (what the recipes use): every key present, equal."""
    return all(labels.get(k) == v for k, v in selector.items())


def test_recipes_ask_for_two_distinct_roles_in_rays_syntax():
    train, data = roles()
    assert train and data, "both roles must be set: an empty one would let that work run on any node"
    for labels in (train, data):
        assert validate_label_selector(labels) is None
        validate_node_label_syntax(labels)  # also valid as node labels, so a node can carry them
        validate_node_labels(labels)  # not in Ray's reserved ray.io/ namespace
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) for v in labels.values()), (
            "plain values only (no !, in(...)): matches() and the cluster files assume equality"
        )
    # A node of one role never satisfies the other's selector.
    assert not matches(train, data) and not matches(data, train)


def test_aws_node_types_carry_the_recipes_roles():
    train, data = roles()
    cfg = aws_config()
    # What the launcher hands to `ray start` (RAY_OVERRIDE_LABELS) is read after Ray's defaults are filled.
    types = prepare_config(copy.deepcopy(cfg))["available_node_types"]
    head = types.pop(cfg["head_node_type"])
    assert not head.get("labels"), "the head takes no role"
    assert head["resources"]["CPU"] == 0, "the head runs no task or actor"
    assert types
    for name, node in types.items():
        want = role_of(node["resources"].get("GPU", 0))
        assert node.get("labels") == want, f"{name}: labels {node.get('labels')}, its role is {want}"
        validate_node_label_syntax(node["labels"])
        assert matches(train, node["labels"]) != matches(data, node["labels"]), name
    for role in (train, data):
        typed = [v for v in types.values() if v["labels"] == role]
        assert typed, f"no node type carries {role}"
        # Each role starts from zero nodes: the autoscaler adds them when their work waits.
        assert all(v.get("min_workers", 0) == 0 and v["max_workers"] >= 1 for v in typed), role
    # One source for the labels: `labels:` per node type, never a --labels of its own in a start command.
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "--labels" not in cmd


def label_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def test_ray_start_takes_the_documented_labels():
    # `ray start --labels` is hidden from `ray start --help` in Ray 2.60, but there.
    from ray.scripts.scripts import start

    assert "labels" in {p.name for p in start.params}
    train, data = roles()
    assert parse_node_labels_string(",".join(f"{k}={v}" for k, v in data.items())) == data
    # Every `--labels` the READMEs show parses, with Ray's own parser, to one of the recipes' roles.
    shown = {}
    for doc in (REPO / "README.md", CLUSTER / "README.md"):
        for m in re.finditer(r"--labels[= ]+(\"[^\"]*\"|'[^']*'|[^\s`]+)", doc.read_text()):
            labels = parse_node_labels_string(m.group(1).strip("'\""))
            validate_node_label_syntax(labels)
            assert labels in (train, data), (
                f"{doc.relative_to(REPO)}: --labels {m.group(1)} is not a role of the recipes"
            )
            shown[label_text(labels)] = labels
    assert sorted(shown.values(), key=label_text) == sorted([train, data], key=label_text), (
        "cluster/README.md should show how to start a node of each role"
    )


# --- runtime envs ------------------------------------------------------------------------------


def test_runtime_envs_are_valid_and_pinned_as_tested():
    full, local = load(CLUSTER / "runtime_env.yaml"), load(CLUSTER / "runtime_env.local.yaml")
    RuntimeEnv(**full)  # Ray's own validation of each field
    RuntimeEnv(**local)
    pins = pip_pins(full["pip"])
    assert set(pins) == NEEDED
    tested = constraints()
    assert {k: tested.get(k) for k in pins} == pins, "runtime_env.yaml pins differ from constraints.txt"
    # The local head runs these from the project's venv: it must already hold exactly these.
    installed = {k: importlib.metadata.version(k).split("+")[0] for k in pins}
    assert installed == pins
    assert set(local) == {"working_dir", "excludes"}, "the local env must not build a per-job virtualenv"
    assert full["excludes"] == local["excludes"]
    assert full["working_dir"] == local["working_dir"] == "."


def test_working_dir_upload_is_small_and_complete(tmp_path):
    excludes = load(CLUSTER / "runtime_env.yaml")["excludes"]
    pkg = tmp_path / "working_dir.zip"
    # Without .gitignore: the excludes alone must keep the upload small.
    packaging.create_package(str(REPO), pkg, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(pkg).namelist()
    for needed in (
        "pipelines/__main__.py",
        "pipelines/config.py",
        "slowfast/model/config.py",
        "configs/k400_slowfast_8x8_r50.yaml",
        "configs/k400_slowfast_4x16_r50.yaml",
        "constraints.txt",
        "pyproject.toml",
    ):
        assert needed in names
    leaked = [
        n
        for n in names
        if re.match(r"(\.git|\.venv|storage|data|out)/", n)
        or "__pycache__/" in n
        or ".egg-info/" in n
        or n.endswith("mlflow.db")
    ]
    assert not leaked, leaked[:5]
    assert pkg.stat().st_size < 5 * 2**20


# --- KubeRay -----------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict]]:
    return {p.name: load_all(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def one(name: str, kind: str) -> dict:
    docs = [d for d in manifests()[name] if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def cronjob_template() -> dict:
    cm = one("cronjob.yaml", "ConfigMap")
    return yaml.safe_load(cm["data"]["rayjob.yaml"])


def rayjob_specs() -> dict[str, dict]:
    return {
        "rayjob.yaml": one("rayjob.yaml", "RayJob")["spec"],
        "raycronjob.yaml jobTemplate": one("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"],
        "cronjob.yaml ConfigMap template": cronjob_template()["spec"],
    }


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_every_manifest_names_its_api_kind_and_name():
    docs = manifests()
    assert set(docs) == {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"}
    for name, items in docs.items():
        for d in items:
            assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), name
    assert one("raycluster.yaml", "RayCluster")["apiVersion"] == "ray.io/v1"
    assert one("rayjob.yaml", "RayJob")["apiVersion"] == "ray.io/v1"
    assert one("raycronjob.yaml", "RayCronJob")["apiVersion"] == "ray.io/v1"
    assert one("cronjob.yaml", "CronJob")["apiVersion"] == "batch/v1"
    template = cronjob_template()
    assert (template["apiVersion"], template["kind"]) == ("ray.io/v1", "RayJob")
    assert template["metadata"]["generateName"] and "name" not in template["metadata"]


def test_ray_images_and_versions_are_pinned_to_the_installed_ray():
    found = images(manifests()) + images(cronjob_template()) + [aws_config()["docker"]["image"]]
    ray_images = [i for i in found if i.startswith("rayproject/")]
    assert ray_images and set(ray_images) == {RAY_IMAGE}
    others = set(found) - {RAY_IMAGE}
    for image in others:
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{image}: pin a tag"
    cluster_specs = [one("raycluster.yaml", "RayCluster")["spec"]] + [
        s["rayClusterSpec"] for s in rayjob_specs().values()
    ]
    assert all(s["rayVersion"] == ray.__version__ for s in cluster_specs)


def test_raycluster_autoscales_gpu_workers_from_zero():
    spec = one("raycluster.yaml", "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    recipe = load_config(REPO / "configs/k400_slowfast_8x8_r50.yaml")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= most(recipe.train.num_workers)
    # Every RayJob's cluster is this one, so the three stay in step.
    for where, s in rayjob_specs().items():
        assert s["rayClusterSpec"] == spec, where


@pytest.mark.parametrize("where", list(rayjob_specs()))
def test_rayjob_specs_run_the_pipeline_and_clean_up(where):
    spec = rayjob_specs()[where]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    # The entrypoint is `python -m pipelines run --config <file in this repo> --set ...`, and the
    # config loads with those overrides.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines", "run"]
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert (REPO / config).is_file()
    cfg = load_config(REPO / config, sets)
    assert cfg.storage_root.startswith("s3://") and cfg.mlflow.tracking_uri.startswith("http")
    # The runtime env: code from a remote zip, the same pins as runtime_env.yaml.
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert packaging.is_zip_uri(env["working_dir"]) and env["working_dir"].split("://")[0] in {"s3", "gs", "https"}
    assert env["pip"] == load(CLUSTER / "runtime_env.yaml")["pip"]


def test_raycronjob_schedule_and_template():
    cron = one("raycronjob.yaml", "RayCronJob")
    # Only the fields KubeRay 1.6's RayCronJob has (an unknown field is dropped or refused).
    assert set(cron["spec"]) <= {"schedule", "suspend", "jobTemplate"}
    parse_cron(cron["spec"]["schedule"])
    assert cron["spec"].get("suspend", False) is False
    # No concurrency policy in RayCronJob: the deadline keeps runs from overlapping.
    deadline = cron["spec"]["jobTemplate"]["activeDeadlineSeconds"]
    assert deadline < shortest_period_s(cron["spec"]["schedule"])
    assert cron["spec"]["jobTemplate"] == cronjob_template()["spec"]


def test_cronjob_fallback_forbids_overlap_with_least_privilege():
    cronjob = one("cronjob.yaml", "CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    parse_cron(spec["schedule"])
    assert spec["schedule"] == one("raycronjob.yaml", "RayCronJob")["spec"]["schedule"]
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # never a second RayJob
    assert job["activeDeadlineSeconds"] > cronjob_template()["spec"]["activeDeadlineSeconds"]
    sa = one("cronjob.yaml", "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    role = one("cronjob.yaml", "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}
    ]
    binding = one("cronjob.yaml", "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", sa)]
    # The pod creates the RayJob from the ConfigMap it mounts, and waits for it.
    volume = pod["volumes"][0]["configMap"]["name"]
    assert volume == one("cronjob.yaml", "ConfigMap")["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    assert "kubectl create -f /template/rayjob.yaml" in script and "jobDeploymentStatus" in script


def cluster_specs() -> dict[str, dict]:
    """Every RayClusterSpec in cluster/kuberay: the RayCluster's and each RayJob's."""
    return {
        "raycluster.yaml": one("raycluster.yaml", "RayCluster")["spec"],
        **{where: s["rayClusterSpec"] for where, s in rayjob_specs().items()},
    }


def pod_gpus(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in group["template"]["spec"]["containers"]
    )


@pytest.mark.parametrize("where", list(cluster_specs()))
def test_kuberay_groups_carry_the_recipes_roles(where):
    train, data = roles()
    spec = cluster_specs()[where]
    head = spec["headGroupSpec"]
    assert not head.get("labels"), f"{where}: the head takes no role"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head runs no task or actor"
    assert pod_gpus(head) == 0
    groups = spec["workerGroupSpecs"]
    for group in [head] + groups:
        # KubeRay (>= 1.5) refuses labels in rayStartParams: the group's own `labels` field sets them.
        assert "labels" not in group.get("rayStartParams", {}), f"{where}: labels belong in the group's labels field"
    for group in groups:
        want = role_of(pod_gpus(group))
        assert group.get("labels") == want, f"{where} {group['groupName']}: labels {group.get('labels')}, role {want}"
        validate_node_label_syntax(group["labels"])
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, f"{where} {group['groupName']}"
    for role in (train, data):
        assert any(g["labels"] == role for g in groups), f"{where}: no worker group carries {role}"


# --- credentials -------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # AWS secret key shape
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}"),
    re.compile(r"(?i)aws_secret\w*\s*[:=]\s*\S"),
    re.compile(r"(?i)(password|passwd|token|secret)\s*[:=]\s*['\"]?[A-Za-z0-9/+_-]{12,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{48,}\b"),  # long hex tokens (Ray's)
]


def credential_hits(text: str) -> list[str]:
    return [p.pattern for p in SECRET_PATTERNS if p.search(text)]


def test_credential_scan_detects_planted_secrets():
    assert credential_hits("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert credential_hits("      value: AKIAIOSFODNN7EXAMPLE")
    assert credential_hits("RAY_AUTH_TOKEN: " + "ab12" * 16)
    assert not credential_hits("envFrom:\n  - secretRef: {name: slowfast-credentials, optional: true}")


def test_no_literal_credentials_in_cluster_files_or_recipes():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [REPO / c for c in RECIPES]
    hits = {str(p.relative_to(REPO)): credential_hits(p.read_text()) for p in files}
    assert not {k: v for k, v in hits.items() if v}
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.read_text().strip():
        value = token.read_text().strip()
        leaked = [str(p.relative_to(REPO)) for p in files if value in p.read_text()]
        assert not leaked, f"the local Ray token is written in {leaked}"
    # Kubernetes: secret-looking variables only through valueFrom / envFrom, never a value.
    for name, docs in manifests().items():
        for d in docs + ([cronjob_template()] if name == "cronjob.yaml" else []):
            for env in _find_key(d, "env"):
                for var in env:
                    if re.search(r"KEY|SECRET|TOKEN|PASSWORD", var["name"]):
                        assert "value" not in var, f"{name}: {var['name']} is written literally"


def _find_key(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find_key(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find_key(v, key)


def test_manifest_pods_get_credentials_from_a_secret_or_a_role():
    for where, spec in rayjob_specs().items():
        pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        ]
        for pod in pods:
            assert pod["serviceAccountName"] == "slowfast-ray", where  # IRSA
            for c in pod["containers"]:
                assert {"secretRef": {"name": "slowfast-credentials", "optional": True}} in c["envFrom"], where


# --- the paper's recipes -----------------------------------------------------------------------


@pytest.mark.parametrize("path", list(RECIPES))
def test_k400_recipe_has_the_papers_numbers(path):
    cfg = load_config(REPO / path)
    m, t, p, e = cfg.model, cfg.train, cfg.preprocess, cfg.evaluate
    assert m.preset == RECIPES[path]
    assert m.T * m.tau == 64 and m.alpha * m.T == 32 and m.tau // m.alpha == 2  # 32 frames at stride 2
    assert (t.epochs, t.batch_size, t.warmup_epochs, t.weight_decay) == (196, 8, 34, 1e-4)
    assert (t.momentum, t.nesterov, m.dropout) == (0.9, True, 0.5)
    # 8 GPUs x 8 clips is the reference batch, so the linearly scaled lr is exactly 0.1.
    assert t.base_lr * t.batch_size * t.num_workers / LR_REFERENCE_BATCH == pytest.approx(0.1)
    assert (t.crop_size, t.scale_jitter, p.short_side) == (224, (256, 320), 256)
    assert (e.temporal_views, e.spatial_crops) == (10, 3) and p.eval_views >= 10
    assert t.use_gpu and t.mixed_precision and t.num_workers == 8
    assert cfg.data.format == "kinetics_csv" and set(cfg.data.annotations) == {"train", "val"}
    assert cfg.storage_root.startswith("s3://") and cfg.data.video_root.startswith("s3://")
    unexpanded = [k for k, v in cfg.flatten().items() if "${" in str(v)]
    assert not unexpanded, f"the config loader does not expand ${{VAR}}: {unexpanded}"
    # The placeholders are meant to be overridden from the command line.
    over = load_config(REPO / path, ["storage_root=s3://my-bucket/runs", "mlflow.tracking_uri=http://10.0.0.5:5000"])
    assert over.storage_root == "s3://my-bucket/runs" and over.mlflow.tracking_uri == "http://10.0.0.5:5000"


def test_the_two_recipes_differ_only_in_the_model():
    a, b = (load_config(REPO / p).flatten() for p in RECIPES)
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ == {
        "name",
        "model.preset",
        "model.T",
        "model.tau",
        "model.alpha",
        "model.fusion_kernel",
        "mlflow.model_name",
    }
