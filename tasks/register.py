"""Stage 8, register: log the trained policy and the reward model to the MLflow registry and
gate the policy's promotion.

Every new version gets the alias ``challenger``. ``champion`` moves to it only through the gate in
mlflow_io/registry.py: its evaluation is not flagged, and it beats the champion (the base when there
is none) by more than `register.min_improvement`, with the paired CI above zero when
`register.require_ci`. The decision and the lineage (git commit, DVC output hashes, params file)
are written as tags on the version. Writes `paths.metrics`/register.json, and `paths.champion`
(the version the next evaluate compares against). The gate here never re-promotes a version that was
rolled back; a person can, with `grpo-agents promote --version N`.

A rerun with the same inputs (policy and reward model files, eval.json and reward.json, `register`
params, device, and the code the pyfuncs package: grpo/ and mlflow_io/) adds no version: the one
tagged with the same `inputs_sha256` is reused and meets the gate again. Each version is created
together with its tags, so this holds after a run killed midway too (tests/reliability/test_crash.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import subprocess
from pathlib import Path

import yaml
from mlflow import MlflowClient

from grpo.io import read_json, tree_sha256, update_with_tree, write_json
from grpo_agents.params import PARAMS_FILE, Paths, RegisterParams
from mlflow_io.registry import find_version, log_agent, log_reward_model, promote, sync_champion
from mlflow_io.tracking import active_run_id, log_artifact, log_dict

log = logging.getLogger(__name__)


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


def refuse_non_finite(evaluation: dict, metric: str, source: str) -> None:
    """Refuse an evaluation with a NaN or an infinity among the figures the gate reads: such a run
    is never registered."""
    figures = {
        f"trained.{metric}": evaluation["trained"][metric],
        "base.reward_mean": evaluation["base"]["reward_mean"],
        **{
            f"{vs}.{k}": evaluation[vs][k]
            for vs in ("vs_base", "vs_champion")
            if vs in evaluation
            for k in ("mean", "ci_low", "ci_high")
        },
    }
    bad = [k for k, v in figures.items() if not math.isfinite(float(v))]
    if bad:
        raise FloatingPointError(f"{source}: non-finite {', '.join(bad)}; nothing was registered")


def inputs_digest(register: RegisterParams, device: str, paths: Paths) -> str:
    """sha256 of everything a registered version is made of, the code it packages included."""
    digest = hashlib.sha256(register.model_dump_json().encode() + device.encode())
    for root in (paths.policy, paths.reward_model, "grpo", "mlflow_io"):
        update_with_tree(digest, root)
    for metrics in ("eval.json", "reward.json"):
        digest.update(Path(paths.metrics, metrics).read_bytes())
    return digest.hexdigest()


def register_new(register: RegisterParams, device: str, paths: Paths, evaluation: dict, digest: str) -> tuple[str, str]:
    """Log the agent and the reward model as new versions, each created with its tags (the lineage,
    and ``inputs_sha256`` = ``digest``); returns both versions. A reward model version already
    registered from ``digest`` (by a run killed before the agent's) is reused."""
    client, name = MlflowClient(), register.model_name
    reward = find_version(client, register.reward_model_name, "inputs_sha256", digest)
    if reward is None:
        heldout = read_json(f"{paths.metrics}/reward.json")
        tags = {**{f"heldout.{k}": v for k, v in heldout.items()}, "inputs_sha256": digest}
        reward_version = log_reward_model(register.reward_model_name, paths.reward_model, device, tags)
    else:
        reward_version = str(reward.version)
        client.set_registered_model_alias(register.reward_model_name, "challenger", reward_version)
    log_artifact(str(PARAMS_FILE))
    lineage = {
        "git_commit": git_commit(),
        "params_sha256": hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest(),
        "inputs_sha256": digest,
        "policy_sha256": tree_sha256(paths.policy),  # how evaluate knows the champion is this policy
        "mlflow_run_id": active_run_id(),
        "reward_model": f"{register.reward_model_name}/{reward_version}",
        **dvc_hashes(),
    }
    version = log_agent(name, paths.policy, device, {**evaluation_tags(evaluation, register.metric), **lineage})
    return version, reward_version


def run(register: RegisterParams, device: str, paths: Paths) -> dict:
    name, metric = register.model_name, register.metric
    evaluation = read_json(f"{paths.metrics}/eval.json")
    refuse_non_finite(evaluation, metric, f"{paths.metrics}/eval.json")
    client = MlflowClient()
    digest = inputs_digest(register, device, paths)
    existing = find_version(client, name, "inputs_sha256", digest)
    if existing is None:
        version, reward_version = register_new(register, device, paths, evaluation, digest)
    else:
        log.info("%s version %s was registered from the same inputs: no new version", name, existing.version)
        version, reward_version = str(existing.version), existing.tags["reward_model"].rsplit("/", 1)[1]
        client.set_registered_model_alias(name, "challenger", version)  # a run killed before it was set
    decision = promote(
        client,
        name,
        version,
        metric,
        register.min_improvement,
        "register stage (automatic gate)",
        register.require_ci,
        automatic=True,
    )
    sync_champion(client, name, paths)
    result = {
        "model_name": name,
        "version": int(version),
        "new_version": existing is None,
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "aliases": sorted(client.get_model_version(name, version).aliases),
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
