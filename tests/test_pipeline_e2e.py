"""The whole pipeline on tiny models, in temporary copies of the repo: once through the Prefect
flow as `grpo-agents run` starts it (then `dvc repro` finds nothing to do, a calibrate-only change
reruns calibrate and what follows, and a second flow run skips everything). `dvc repro` from scratch
runs in tests/reliability/test_crash.py, killed during each stage in turn."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import pandas as pd
import pytest
from conftest import BIN, check_outputs, dvc_status, make_project, mlflow_client, sh, write_params

from grpo_agents.stages import STAGES


def test_registered_models_predict_as_pyfuncs(flow_project):
    """What `mlflow models serve` runs: the agent answers each conversation, the reward model scores it."""
    import mlflow

    project, _, _ = flow_project
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow/mlflow.db'}")
    try:
        conversation = [{"role": "user", "content": "Where is my order?"}]
        agent = mlflow.pyfunc.load_model("models:/grpo-agent@champion")
        replies = agent.predict(pd.DataFrame({"messages": [conversation, conversation[:1]]}))
        assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
        reward = mlflow.pyfunc.load_model("models:/grpo-reward@challenger")
        scores = reward.predict(
            pd.DataFrame(
                {
                    "messages": [
                        [*conversation, {"role": "assistant", "content": r}]
                        for r in ("Let me check that for you.", "No.")
                    ]
                }
            )
        )
        assert len(scores) == 2 and all(isinstance(x, float) and x == x for x in scores)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, tiny_model_dir):
    project, env = make_project(tmp_path_factory.mktemp("flow"), tiny_model_dir)
    env = {**env, "JUDGE_API_KEY": JUDGE_SECRET}  # label's judge client sends it; nothing may record it
    out = sh([str(BIN / "grpo-agents"), "run"], project, env)
    return project, env, out


JUDGE_SECRET = f"sk-test-{uuid.uuid4().hex}"  # made here, so no source file holds it


def test_the_judge_key_reaches_no_file_log_or_output(flow_project):
    """The key is read from the variable that judge.api_key_env names and sent to the judge; it
    must not reach the console, the MLflow store, the metrics, the DVC lock or Prefect's database."""
    project, _, out = flow_project
    assert JUDGE_SECRET not in out
    checked = 0
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert JUDGE_SECRET.encode() not in path.read_bytes(), path
            checked += 1
    assert checked > 100 and (project / "mlflow/mlflow.db").exists() and (project / ".prefect").is_dir()


def test_flow_runs_every_stage_and_registers(flow_project):
    project, env, out = flow_project
    check_outputs(project)
    assert "grpo-pipeline summary" in out and "version 1, aliases challenger, champion" in out
    # the warm start ran (tests/conftest.py): the summary puts the SFT policy beside base and trained
    assert "SFT only" in out and "trained - sft: " in out and "tool scenarios: episodes that called base " in out
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("grpo-agents")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "grpo-pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    for r in children:
        assert r.data.params, r.data.tags["stage"]
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert (
        "spearman" in by_stage["train_reward"].data.metrics and "reward_mean" in by_stage["train_policy"].data.metrics
    )
    assert dvc_status(project, env) == {}
    sh([str(BIN / "dvc"), "plots", "show"], project, env)
    page = (project / "dvc_plots/index.html").read_text()
    assert all(column in page for column in ("reward_mean", "reward_trained", "std_after", "pair"))


def test_rollouts_on_a_dask_cluster_write_what_one_process_wrote(flow_project, tmp_path):
    """`grpo-agents run --rollout-workers 2`: label's and evaluate's rollout jobs run as Prefect tasks
    on a local 2-worker Dask cluster (prefect-dask), and their outputs are byte for byte those the
    flow wrote running the jobs one after another, so DVC finds nothing else to rerun. In a copy of
    the project with a fresh MLflow store (its artifact paths are absolute), before any test here
    moves the champion."""
    project, env, _ = flow_project
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
    shutil.rmtree(copy / "mlflow/artifacts")
    (copy / "mlflow/mlflow.db").unlink()
    outputs = ["data/labels/labels.parquet", "metrics/eval.json", "plots/eval.csv"]  # not label.json: it has tokens/s
    for f in outputs:
        (copy / f).unlink()
    env = {**env, "PREFECT_HOME": str(copy / ".prefect")}
    out = sh([str(BIN / "grpo-agents"), "run", "--rollout-workers", "2"], copy, env)
    assert {s for s in STAGES if f"stage {s} started" in out} == {"label", "evaluate"}, out[-3000:]
    assert "label: 2 rollout jobs on a local Dask cluster of 2 workers" in out
    assert "evaluate: 6 rollout jobs on a local Dask cluster of 2 workers" in out  # 3 policies x 2 sets
    for name in ("label 0", "label 8", "eval held-out trained", "eval bitext base"):
        assert f"Task run '{name}' - Finished in state Completed()" in out, name
    for f in outputs:
        assert (copy / f).read_bytes() == (project / f).read_bytes(), f
    assert dvc_status(copy, env) == {}


def test_dvc_repro_after_flow_runs_nothing_then_only_what_a_param_touches(flow_project):
    project, env, _ = flow_project
    out = sh([str(BIN / "dvc"), "repro"], project, env)
    assert "Running stage" not in out
    # above any [0, 1] component's std: the calibration must change
    write_params(project / "params.yaml", {"calibrate.min_std": 0.5}, source=project / "params.yaml")
    assert set(dvc_status(project, env)) == {"calibrate"}
    out = sh([str(BIN / "dvc"), "repro"], project, env)
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"calibrate", "train_policy", "evaluate", "register"}, out[-3000:]
    reg = json.loads((project / "metrics/register.json").read_text())
    assert reg["version"] == 2 and "challenger" in reg["aliases"]
    # after dvc repro, the next flow run skips every stage
    sh([sys.executable, "-m", "flows.pipeline"], project, env)
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("grpo-agents")
    last = client.search_runs(
        [exp.experiment_id], "tags.mlflow.runName = 'grpo-pipeline'", order_by=["start_time DESC"]
    )[0]
    assert last.data.tags["stages_run"] == "none" and last.data.tags["stages_skipped"] == ",".join(STAGES)


def test_chat_with_the_champion_in_the_terminal(flow_project):
    project, env, _ = flow_project
    res = subprocess.run(
        [str(BIN / "grpo-agents"), "chat"],
        cwd=project,
        env=env,
        input="Hello\nMy order is late.\n\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chatting with models:/grpo-agent@champion" in res.stdout and res.stdout.count("agent> ") == 2
    evaluation = pd.read_parquet(project / "data/prepared/eval.parquet")
    scenario = evaluation[evaluation["tools"].map(len) > 0].iloc[0]
    chat = [str(BIN / "grpo-agents"), "chat", "--scenario"]
    res = subprocess.run([*chat, scenario["id"]], cwd=project, env=env, input="\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"scenario {scenario['id']}" in res.stdout and f"you> {scenario['opening']}" in res.stdout
    assert "agent> " in res.stdout
    res = subprocess.run([*chat, "nope"], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "error: no scenario 'nope' in data/prepared" in res.stderr


def test_dvc_repro_with_sft_off_writes_what_dvc_expects(tmp_path, tiny_model_dir):
    """sft.enabled false: the stage writes every output dvc.yaml declares (a note that it was
    skipped), so `dvc repro` goes on, and train_policy starts from the base."""
    project, env = make_project(tmp_path, tiny_model_dir)
    write_params(project / "params.yaml", {"sft.enabled": False}, source=project / "params.yaml")
    sh([str(BIN / "dvc"), "repro", "sft"], project, env)
    assert json.loads((project / "metrics/sft.json").read_text()) == {"enabled": 0}
    assert json.loads((project / "data/models/sft/SKIPPED.json").read_text())["start_model"] == "data/models/base"
    assert pd.read_csv(project / "plots/sft.csv").empty and dvc_status(project, env).get("sft") is None


def test_a_failed_dvc_repro_keeps_the_previous_outputs(tmp_path, tiny_model_dir):
    """DVC deletes a stage's outputs before running it unless they persist; ours do, so a stage that
    fails on bad input leaves the previous version in place, and dvc.lock still describes it."""
    project, env = make_project(tmp_path, tiny_model_dir)
    sh([str(BIN / "dvc"), "repro", "prepare"], project, env)
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    (project / "data/scenarios/bad.yaml").write_text("schema_version: 2\nscenarios:\n- id: x\n")
    res = subprocess.run([str(BIN / "dvc"), "repro", "prepare"], cwd=project, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "bad.yaml: entry 0 (id 'x'): missing field" in res.stdout + res.stderr
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before
    (project / "data/scenarios/bad.yaml").unlink()
    assert "prepare" not in dvc_status(project, env)  # dvc.lock still describes the outputs kept


def test_served_alias_answers_the_openai_sdk_and_follows_the_alias(flow_project):
    """`grpo-agents serve` on the registry the pipeline filled: the SDK gets replies, and moving
    the alias to another version reloads the model. The server's key (GRPO_API_KEY) reaches none
    of its output, nor any file of the project."""
    import socket
    import time

    import openai

    project, env, _ = flow_project
    client = mlflow_client(project)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='grpo-agent'"))
    assert len(versions) >= 2  # v1 from the flow, v2 from the repro test
    client.set_registered_model_alias("grpo-agent", "e2e", str(versions[0]))
    write_params(project / "params.yaml", {"serve.poll_seconds": 1}, source=project / "params.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = f"sk-serve-{uuid.uuid4().hex}"
    log = project.parent / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "grpo-agents"), "serve", "--alias", "e2e", "--port", str(port)],
            cwd=project,
            env={**env, "GRPO_API_KEY": key},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        for _ in range(120):
            try:
                ids = [m.id for m in sdk.models.list().data]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.5)
        assert ids == [f"grpo-agent@e2e:v{versions[0]}"]
        reply = sdk.chat.completions.create(
            model="grpo-agent", messages=[{"role": "user", "content": "Hello"}], max_tokens=5
        )
        assert reply.choices[0].message.content is not None
        client.set_registered_model_alias("grpo-agent", "e2e", str(versions[-1]))
        for _ in range(60):
            if sdk.models.list().data[0].id.endswith(f":v{versions[-1]}"):
                break
            time.sleep(0.5)
        assert sdk.models.list().data[0].id == f"grpo-agent@e2e:v{versions[-1]}"
        with pytest.raises(openai.AuthenticationError):  # a wrong key is refused
            openai.OpenAI(base_url=sdk.base_url, api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Uvicorn running on" in text and "401" in text  # the output was captured, the refusal too
    assert key not in text
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert key.encode() not in path.read_bytes(), path


def test_register_with_unchanged_inputs_adds_no_version(flow_project):
    """`dvc repro -f -s register` with nothing changed reuses the version registered from the same
    inputs, and leaves the champion's promotion record as it was."""
    project, env, _ = flow_project
    client = mlflow_client(project)
    before = sorted(int(v.version) for v in client.search_model_versions("name='grpo-agent'"))
    last = json.loads((project / "metrics/register.json").read_text())
    sh([str(BIN / "dvc"), "repro", "-f", "-s", "register"], project, env)
    reg = json.loads((project / "metrics/register.json").read_text())
    assert reg["version"] == last["version"] and reg["new_version"] is False
    assert sorted(int(v.version) for v in client.search_model_versions("name='grpo-agent'")) == before
    assert len(client.search_model_versions("name='grpo-reward'")) == len(before)
    champion = client.get_model_version_by_alias("grpo-agent", "champion")
    assert champion.tags["promotion.decision"] == "promoted"


def test_dvc_push_then_pull_in_a_fresh_clone_restores_every_output(flow_project):
    """The shipped remote (`local`, ../grpo-dvc-remote beside the checkout): commit the run (dvc.lock,
    metrics, plots), `dvc push`, clone beside it, `dvc pull`: every output is back and up to date."""
    project, env, _ = flow_project
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-qm", "a run to share"], project, env)
    sh([str(BIN / "dvc"), "push"], project, env)
    assert (project.parent / "grpo-dvc-remote").is_dir()
    clone = project.parent / "pulled"
    sh(["git", "clone", "-q", str(project), str(clone)], project.parent, env)
    assert not (clone / "data/models/policy").exists()
    sh([str(BIN / "dvc"), "pull"], clone, env)
    for path in ("data/models/policy/model.safetensors", "data/prepared/train.parquet", "data/labels/labels.parquet"):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path
    assert dvc_status(clone, env) == {}


# Registers the base model as if another project had trained it, with an evaluation that passes the
# gate against the current champion.
REGISTER_ELSEWHERE = """
from mlflow import MlflowClient
from grpo_agents.params import load_params
from mlflow_io.registry import log_agent
from mlflow_io.tracking import setup
params = load_params()
setup(params)
client = MlflowClient()
champion = client.get_model_version_by_alias("grpo-agent", "champion").version
evaluation = {"reward_mean": 1, "vs_champion.version": champion, "vs_champion.mean": 0.5, "vs_champion.ci_low": 0.1}
tags = {**{f"eval.{k}": v for k, v in evaluation.items()}, "eval.flagged": "false"}
version = log_agent("grpo-agent", params.paths.base_model, "cpu", tags)
print("registered version", version)
"""


def test_dvc_repro_re_evaluates_when_the_champion_moves(flow_project):
    """DVC sees the registry's champion through mlflow/champion.json, a dependency of evaluate: a
    version from elsewhere promoted with `grpo-agents promote` makes evaluate stale, a rollback
    makes it clean again, and `dvc repro` re-evaluates against a promoted one."""
    project, env, _ = flow_project
    assert dvc_status(project, env) == {}
    out = sh([sys.executable, "-c", REGISTER_ELSEWHERE], project, env)
    version = out.split("registered version ")[1].split()[0]
    assert dvc_status(project, env) == {}  # registering moves no alias
    grpo_agents = str(BIN / "grpo-agents")
    sh([grpo_agents, "promote", "--version", version], project, env)
    assert json.loads((project / "mlflow/champion.json").read_text())["version"] == version
    assert set(dvc_status(project, env)) == {"evaluate"}
    sh([grpo_agents, "rollback"], project, env)  # the champion evaluate compared against is back
    assert dvc_status(project, env) == {}
    sh([grpo_agents, "promote", "--version", version], project, env)  # by hand, after a rollback: allowed
    assert set(dvc_status(project, env)) == {"evaluate"}
    out = sh([str(BIN / "dvc"), "repro"], project, env)
    assert {s for s in STAGES if f"Running stage '{s}'" in out} == {"evaluate", "register"}, out[-3000:]
    assert json.loads((project / "metrics/eval.json").read_text())["champion_version"] == version
    assert dvc_status(project, env) == {}
    # Moved some other way (the MLflow UI does this): DVC sees it after `grpo-agents champion`.
    client = mlflow_client(project)
    client.set_registered_model_alias("grpo-agent", "champion", "1")
    assert dvc_status(project, env) == {}
    sh([grpo_agents, "champion"], project, env)
    assert set(dvc_status(project, env)) == {"evaluate"}
    client.set_registered_model_alias("grpo-agent", "champion", version)
    sh([grpo_agents, "champion"], project, env)
    assert dvc_status(project, env) == {}


def test_dvc_experiments_keep_their_metrics(flow_project):
    """An experiment with `dvc exp run -S`, a profile: `dvc exp show` has the experiment's params
    and its metrics (metrics/ is committed with each experiment, so it must not be git-ignored).
    Last in this module: the workspace keeps the experiment's params. (One experiment: each reruns
    train_policy, evaluate and register, about 70 s here.)"""
    project, env, _ = flow_project
    # A profile, with the learning rate set back to null so that the preset's applies.
    sh(
        [str(BIN / "dvc"), "exp", "run", "-S", "profile=aggressive", "-S", "train_policy.learning_rate=null"],
        project,
        env,
    )
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], project, env).strip().splitlines()[-1])

    def experiments(node):
        if isinstance(node, dict):
            if node.get("name") and isinstance(node.get("data"), dict) and node["name"] != "workspace":
                yield node["data"]
            for value in node.values():
                yield from experiments(value)
        elif isinstance(node, list):
            for value in node:
                yield from experiments(value)

    found = {}
    for data in experiments(shown):
        params = data["params"]["params.yaml"]["data"]
        point = params["train_policy"]["learning_rate"] or params["profile"]
        found[point] = data["metrics"]["metrics/eval.json"].get("data", {}).get("trained", {}).get("reward_mean")
    assert found.get("aggressive") is not None, found
    # The last train_policy run (the experiment's) trained with the preset's values.
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("grpo-agents")
    last = client.search_runs([exp.experiment_id], "tags.stage = 'train_policy'", order_by=["start_time DESC"])[0]
    assert float(last.data.params["train_policy.learning_rate"]) == 0.001
    assert float(last.data.params["train_policy.beta"]) == 0.0
