"""Stage 7, register: log the trained policy and the reward model to the MLflow registry and
gate the policy's promotion.

Every new version gets the alias ``challenger``. ``champion`` moves to it only through the gate in
tasks/registry.py: its evaluation is not flagged, and it beats the champion (the base when there is
none) by more than `register.min_improvement`, with the paired CI above zero when
`register.require_ci`. The decision and the lineage (git commit, DVC output
hashes, params file) are written as tags on the version. Writes `paths.metrics`/register.json.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from grpo.io import read_json, write_json
from tasks.common import PARAMS_FILE, cli, stage_run
from tasks.registry import promote

REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "pandas", "mlflow")
EXAMPLE = pd.DataFrame({"messages": [[{"role": "user", "content": "Where is my order?"}]]})


def log_reward_model(mlflow, client, params: dict) -> str:
    """Register the reward model under its own name; returns its version."""
    paths, name = params["paths"], params["register"]["reward_model_name"]
    info = mlflow.pyfunc.log_model(
        name="reward_model",
        python_model=str(Path(__file__).with_name("reward_pyfunc.py")),
        artifacts={"reward_model": paths["reward_model"]},
        code_paths=["grpo"],
        model_config={"device": params["device"]},
        input_example=pd.DataFrame({"messages": [[*EXAMPLE["messages"][0], {"role": "assistant", "content": "Let me check."}]]}),
        pip_requirements=[f"{r}=={md.version(r)}" for r in (*REQUIREMENTS, "sentence-transformers")],
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    for k, v in read_json(f"{paths['metrics']}/reward.json").items():
        client.set_model_version_tag(name, version, f"heldout.{k}", str(v))
    client.set_registered_model_alias(name, "challenger", version)
    return version


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def dvc_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every DVC output recorded in dvc.lock, keyed ``dvc.<stage>.<path>``."""
    if not lock.exists():
        return {}
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    return {f"dvc.{s}.{o['path']}": o.get("md5", "") for s, st in stages.items() for o in st.get("outs", [])}


def run(params: dict) -> dict:
    paths, p = params["paths"], params["register"]
    name, metric = p["model_name"], p["metric"]
    evaluation = read_json(f"{paths['metrics']}/eval.json")
    score = float(evaluation["trained"][metric])
    with stage_run("register", params, ("register",)) as (mlflow, run):
        client = mlflow.MlflowClient()
        info = mlflow.pyfunc.log_model(
            name="agent",
            python_model=str(Path(__file__).with_name("agent_pyfunc.py")),
            artifacts={"policy": paths["policy"]},
            code_paths=["grpo"],
            model_config={"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "device": params["device"]},
            input_example=EXAMPLE,
            pip_requirements=[f"{r}=={md.version(r)}" for r in REQUIREMENTS],
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
        reward_version = log_reward_model(mlflow, client, params)
        mlflow.log_artifact(str(PARAMS_FILE))
        tags = {
            f"eval.{metric}": score,
            "eval.base_reward_mean": evaluation["base"]["reward_mean"],
            **{f"eval.{vs}.{k}": evaluation[vs][k] for vs in ("vs_base", "vs_champion") if vs in evaluation
               for k in ("mean", "ci_low", "ci_high")},
            **({"eval.vs_champion.version": evaluation["champion_version"]} if evaluation.get("champion_version") else {}),
            "eval.judge_win_rate_vs_base": evaluation["judge"]["vs_base"]["win_rate"],
            "eval.flagged": str(evaluation["flagged"]).lower(),
            "eval.flags": "; ".join(evaluation["flags"]) or "none",
            "git_commit": git_commit(),
            "params_sha256": hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest(),
            "mlflow_run_id": run.info.run_id,
            "reward_model": f"{p['reward_model_name']}/{reward_version}",
            **dvc_hashes(),
        }
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, str(v))
        client.set_registered_model_alias(name, "challenger", version)
        decision = promote(client, name, version, metric, p["min_improvement"], "register stage (automatic gate)", p["require_ci"])
        result = {"model_name": name, "version": int(version), "promoted": decision["promoted"], "reason": decision["reason"],
                  "aliases": ["challenger"] + (["champion"] if decision["promoted"] else []), metric: score,
                  "reward_model_name": p["reward_model_name"], "reward_model_version": int(reward_version)}
        mlflow.log_dict(result, "register.json")
    write_json(f"{paths['metrics']}/register.json", result)
    return result


if __name__ == "__main__":
    cli(run)
