"""The Prefect flow follows the one DAG definition, dvc.yaml, and each dvc.yaml stage declares the
code and the params it reads."""

import ast
import inspect
from pathlib import Path

import yaml
from dvc.repo import Repo

from grpo_agents.params import RESOLVED_FROM, Params
from grpo_agents.stages import STAGES, entry, reads

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# params.yaml's layout. It imports every section's config class only to compose Params; a stage
# that reads a section imports that class itself (test_a_stage_imports_the_config_of_each_section).
PARAMS_MODULE = ROOT / "grpo_agents" / "params.py"


def dvc_upstream() -> dict[str, set[str]]:
    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph  # an edge (a, b) means stage a depends on stage b
        return {a.name: set() for a in graph.nodes} | {
            a.name: {b.name for b in graph.successors(a)} for a in graph.nodes
        }


def test_flow_runs_every_dvc_stage_once():
    assert sorted(STAGES) == sorted(dvc_upstream()) and len(set(STAGES)) == len(STAGES)


def test_flow_order_is_a_topological_order_of_dvc_yaml():
    pos = {n: i for i, n in enumerate(STAGES)}
    for stage, ups in dvc_upstream().items():
        for up in ups:
            assert pos[up] < pos[stage], f"{stage} runs before its dependency {up}"


def test_dag_has_the_expected_shape():
    up = dvc_upstream()
    assert up["calibrate"] == {"label", "train_reward"}
    assert {"base_model", "prepare", "train_reward", "calibrate"} <= up["train_policy"]
    assert up["register"] == {"train_policy", "train_reward", "evaluate"}


PACKAGES = ("grpo", "grpo_agents", "mlflow_io", "tasks")


def project_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """The project files (grpo/, grpo_agents/, mlflow_io/, tasks/) a module imports, transitively,
    function-level imports included; grpo_agents/params.py counts but is not followed (PARAMS_MODULE)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            dep = ROOT / (name.replace(".", "/") + ".py")
            if name.split(".")[0] in PACKAGES and dep.exists() and dep not in seen:
                seen.add(dep)
                if dep != PARAMS_MODULE:
                    project_imports(dep, seen)
    return seen


def test_every_stage_depends_on_all_the_code_it_runs():
    """A code change must make DVC rerun every stage whose output it can change."""
    for name, stage in DVC_STAGES.items():
        module = ROOT / "tasks" / f"{name}.py"
        declared = {ROOT / d for d in stage["deps"] if isinstance(d, str) and d.endswith(".py")}
        missing = sorted(str(p.relative_to(ROOT)) for p in (project_imports(module) | {module}) - declared)
        assert not missing, f"dvc.yaml stage {name} lacks deps {missing}"


def test_a_stage_imports_the_config_of_each_section_it_reads():
    """What makes not following grpo_agents/params.py's imports sound: a change to a section's
    config class reaches every stage that reads the section through the stage's own imports."""
    for stage in STAGES:
        imported = project_imports(ROOT / "tasks" / f"{stage}.py")
        for section in reads(stage):
            module = Params.model_fields[section].annotation.__module__
            if module.split(".")[0] in PACKAGES:  # not a plain value (str, int, a Literal)
                assert ROOT / (module.replace(".", "/") + ".py") in imported, f"tasks/{stage}.py: {section}"


def used_keys(stage: str, section: str) -> set[str] | None:
    """The keys of ``section`` the stage's entry function reads as ``section.key``; None when it
    uses the section whole: passes it on (to the library, which may read any key) or copies it."""
    tree = ast.parse(inspect.getsource(entry(stage)))
    attributes = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == section
    ]
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == section]
    keys = {n.attr for n in attributes}
    fields = getattr(Params.model_fields[section].annotation, "model_fields", {})
    return keys if len(uses) == len(attributes) and keys <= set(fields) else None


def test_every_stage_lists_the_params_it_reads():
    """A params change must make DVC rerun every stage that reads it. A stage's sections are its
    entry function's parameters (grpo_agents/stages.py); `paths` is templated into deps and outs.
    A section resolved from others (train_policy from profile and profiles) needs those too."""
    for stage in STAGES:
        listed = set(DVC_STAGES[stage].get("params", []))
        sections = set(reads(stage)) | {s for r in reads(stage) for s in RESOLVED_FROM.get(r, ())}
        for section in sections - {"paths"}:
            if section in listed:
                continue
            keys = used_keys(stage, section)
            missing = (
                [section] if keys is None else sorted(f"{section}.{k}" for k in keys if f"{section}.{k}" not in listed)
            )
            assert keys is not None and not missing, f"dvc.yaml stage {stage} reads but does not list {missing}"
        unread = {p for p in listed if p.split(".")[0] not in sections}
        assert not unread, f"dvc.yaml stage {stage} lists params it does not read: {sorted(unread)}"


def test_the_library_imports_no_orchestration():
    """grpo/ is a plain library: no Prefect, DVC or MLflow, and nothing from the application."""
    banned = ("prefect", "dvc", "mlflow", "grpo_agents", "mlflow_io", "tasks", "flows")
    for path in sorted((ROOT / "grpo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad = [n for n in names if n.split(".")[0] in banned]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_every_output_persists():
    """Without `persist: true`, `dvc repro` deletes an output before its stage runs, and a failed
    stage would lose it (tests/test_pipeline_e2e.py shows the failure case)."""
    for name, stage in DVC_STAGES.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                assert options.get("persist") is True, f"dvc.yaml stage {name}: {path} does not persist"
