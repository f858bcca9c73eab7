"""Stage 7, register: log the trained policy and the reward model to the MLflow registry and
gate the policy's promotion.

Every new version gets the alias ``challenger``. ``champion`` moves to it only through the gate in
mlflow_io/registry.py: its evaluation is not flagged, and it beats the champion (the base when there
is none) by more than `register.min_improvement`, with the paired CI above zero when
`register.require_ci`. The decision and the lineage (git commit, DVC output hashes, params file)
are written as tags on the version. Writes `paths.metrics`/register.json.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml
from mlflow import MlflowClient

from grpo.io import read_json, write_json
from grpo_agents.params import PARAMS_FILE, Paths, RegisterParams
from mlflow_io.registry import log_agent, log_reward_model, promote, set_tags
from mlflow_io.tracking import active_run_id, log_artifact, log_dict


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


def evaluation_tags(evaluation: dict, metric: str) -> dict:
    """What the promotion gate reads from the version: the evaluation's means, CIs and flags."""
    return {
        f"eval.{metric}": float(evaluation["trained"][metric]),
        "eval.base_reward_mean": evaluation["base"]["reward_mean"],
        **{
            f"eval.{vs}.{k}": evaluation[vs][k]
            for vs in ("vs_base", "vs_champion")
            if vs in evaluation
            for k in ("mean", "ci_low", "ci_high")
        },
        **({"eval.vs_champion.version": evaluation["champion_version"]} if evaluation.get("champion_version") else {}),
        "eval.judge_win_rate_vs_base": evaluation["judge"]["vs_base"]["win_rate"],
        "eval.flagged": str(evaluation["flagged"]).lower(),
        "eval.flags": "; ".join(evaluation["flags"]) or "none",
    }


def run(register: RegisterParams, device: str, paths: Paths) -> dict:
    name, metric = register.model_name, register.metric
    evaluation = read_json(f"{paths.metrics}/eval.json")
    version = log_agent(name, paths.policy, device)
    reward_version = log_reward_model(register.reward_model_name, paths.reward_model, device)
    client = MlflowClient()
    set_tags(
        client,
        register.reward_model_name,
        reward_version,
        {f"heldout.{k}": v for k, v in read_json(f"{paths.metrics}/reward.json").items()},
    )
    log_artifact(str(PARAMS_FILE))
    set_tags(
        client,
        name,
        version,
        {
            **evaluation_tags(evaluation, metric),
            "git_commit": git_commit(),
            "params_sha256": hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest(),
            "mlflow_run_id": active_run_id(),
            "reward_model": f"{register.reward_model_name}/{reward_version}",
            **dvc_hashes(),
        },
    )
    decision = promote(
        client, name, version, metric, register.min_improvement, "register stage (automatic gate)", register.require_ci
    )
    result = {
        "model_name": name,
        "version": int(version),
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "aliases": ["challenger"] + (["champion"] if decision["promoted"] else []),
        metric: float(evaluation["trained"][metric]),
        "reward_model_name": register.reward_model_name,
        "reward_model_version": int(reward_version),
    }
    log_dict(result, "register.json")
    write_json(f"{paths.metrics}/register.json", result)
    return result


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("register")
