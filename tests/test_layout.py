"""The layout rule, checked on the source: imports between the project's modules run one way (no cycle,
lazy imports inside functions included), and `slowfast/` imports none of Ray, MLflow, boto3 or `pipelines`."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("slowfast", "pipelines")
FORBIDDEN_IN_SLOWFAST = ("ray", "mlflow", "boto3", "botocore", "moto", "pipelines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports_of(path: Path, package: str = "") -> set[str]:
    """Every module `path` (in `package`) imports, anywhere in the file: top level, functions, TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # An import of pkg.mod.attr counts as one of pkg.mod; importing a package runs its __init__ only.
        graph[name] = {m for m in imports_of(path, package_of(path)) if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import ray.data\n    from mlflow.models import Model\n")
    assert {"ray.data", "mlflow.models", "mlflow.models.Model"} <= imports_of(source)
    source.write_text("from .train import x\nfrom . import tracking\n")
    assert {"pipelines.train", "pipelines.tracking"} <= imports_of(source, "pipelines")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_the_project_modules():
    graph = project_graph()
    assert len(graph) > 30  # every module of both packages was read
    assert cycles(graph) == []


def test_slowfast_imports_no_ray_mlflow_s3_or_pipelines():
    breaches = []
    for path in sorted((REPO / "slowfast").rglob("*.py")):
        for module in imports_of(path, package_of(path)):
            if module.split(".")[0] in FORBIDDEN_IN_SLOWFAST:
                breaches.append(f"{path.relative_to(REPO)}: {module}")
    assert breaches == []


def test_only_the_tracking_module_imports_mlflow():
    users = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "pipelines").rglob("*.py")
        if any(m.split(".")[0] == "mlflow" for m in imports_of(p, package_of(p)))
    )
    assert users == ["pipelines/tracking.py"]
