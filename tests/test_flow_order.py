"""The Prefect flow follows the one DAG definition, dvc.yaml."""

from pathlib import Path

from dvc.repo import Repo

from flows.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]


def dvc_upstream() -> dict[str, set[str]]:
    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph  # an edge (a, b) means stage a depends on stage b
        return {a.name: set() for a in graph.nodes} | {
            a.name: {b.name for b in graph.successors(a)} for a in graph.nodes}


def test_flow_runs_every_dvc_stage_once():
    names = [n for n, _ in STAGES]
    assert sorted(names) == sorted(dvc_upstream()) and len(set(names)) == len(names)


def test_flow_order_is_a_topological_order_of_dvc_yaml():
    pos = {n: i for i, (n, _) in enumerate(STAGES)}
    for stage, ups in dvc_upstream().items():
        for up in ups:
            assert pos[up] < pos[stage], f"{stage} runs before its dependency {up}"


def test_dag_has_the_expected_shape():
    up = dvc_upstream()
    assert up["calibrate"] == {"label", "train_reward"}
    assert {"base_model", "prepare", "train_reward", "calibrate"} <= up["train_policy"]
    assert up["register"] == {"train_policy", "train_reward", "evaluate"}


def project_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """The project files (grpo/, tasks/) a module imports, transitively, function-level imports
    included."""
    import ast

    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            dep = ROOT / (name.replace(".", "/") + ".py")
            if name.split(".")[0] in ("grpo", "tasks") and dep.exists() and dep not in seen:
                seen.add(dep)
                project_imports(dep, seen)
    return seen


def test_every_stage_depends_on_all_the_code_it_runs():
    """A code change must make DVC rerun every stage whose output it can change."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = ROOT / "tasks" / f"{name}.py"
        declared = {ROOT / d for d in stage["deps"] if isinstance(d, str) and d.endswith(".py")}
        missing = sorted(str(p.relative_to(ROOT)) for p in (project_imports(module) | {module}) - declared)
        assert not missing, f"dvc.yaml stage {name} lacks deps {missing}"
