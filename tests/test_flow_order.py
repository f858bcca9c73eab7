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
