"""The model registry: logging the agent and the reward model, the promotion gate, promote and
rollback, and loading a version by alias for the server.

Aliases, not stages: ``champion`` moves only through :func:`promote`, which tags the old champion
``previous_champion`` and records on the new one which version it replaced, so :func:`rollback`
can restore it. Every decision is written as tags on the version: the metric compared, the margin,
the decision, the reason and who decided. The register stage, the ``grpo-agents promote`` and
``rollback`` commands and the Prefect flows in ``flows/registry.py`` call the same functions.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from grpo.io import read_json, tree_sha256, write_json
from grpo_agents.params import Paths, RegisterParams

log = logging.getLogger(__name__)
REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "tokenizers", "pandas", "mlflow")
EXAMPLE = [{"role": "user", "content": "Where is my order?"}]
HERE = Path(__file__).parent


class RegistryError(ValueError):
    pass


def by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(client: MlflowClient, name: str, key: str, value: str):
    """The newest version of ``name`` whose tag ``key`` is ``value``, or None."""
    found = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(key) == value]
    return max(found, key=lambda v: int(v.version), default=None)


def evaluation_champion(client: MlflowClient, name: str, policy_dir: str) -> str | None:
    """The version ``evaluate`` compares the trained policy against: the champion, unless the
    champion was registered from this very policy (its ``policy_sha256`` tag), as after a run that
    promoted its own policy; then the version it replaced (and so on down the chain), which is
    what that run was evaluated against. None when there is none."""
    mine = tree_sha256(policy_dir) if Path(policy_dir).is_dir() else None
    version, seen = by_alias(client, name, "champion"), set()
    while version is not None and mine is not None and version.tags.get("policy_sha256") == mine:
        seen.add(version.version)
        replaced = version.tags.get("promotion.replaced")
        version = client.get_model_version(name, replaced) if replaced and replaced not in seen else None
    return str(version.version) if version is not None else None


def sync_champion(client: MlflowClient, name: str, paths: Paths) -> str | None:
    """Write ``paths.champion``: the version evaluate compares against, as the registry says now.

    DVC cannot see the registry, so this file is how it sees the champion: it is a dependency of
    evaluate. evaluate writes the version it used; every move of the alias (register, promote,
    rollback, and the start of a flow run) rewrites it, so ``dvc status`` shows evaluate as changed
    exactly when the version it would compare against is not the one it did."""
    version = evaluation_champion(client, name, paths.policy)
    current = {"model_name": name, "version": version}
    if not Path(paths.champion).exists() or read_json(paths.champion) != current:
        write_json(paths.champion, current)
        log.info("%s: evaluate compares against %s", paths.champion, f"{name} v{version}" if version else "no champion")
    return version


def version_or_challenger(client: MlflowClient, name: str, version: str | None) -> str:
    if version is not None:
        return str(version)
    challenger = by_alias(client, name, "challenger")
    if challenger is None:
        raise RegistryError(f"{name} has no challenger; pass a version")
    return str(challenger.version)


def download_policy(name: str, version: str, dest: str | None = None) -> str:
    """Local directory of a registered agent version's policy (merged weights + tokenizer)."""
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dest)
    # MLflow keeps an artifact under its directory's own name (artifacts/<basename>); MLmodel maps it.
    flavor = Model.load(local).flavors["python_function"]
    return os.path.join(local, flavor["artifacts"]["policy"]["path"])


def tag(version, key: str) -> float:
    if f"eval.{key}" not in version.tags:
        raise RegistryError(f"version {version.version} has no tag 'eval.{key}'; was it registered by the pipeline?")
    return float(version.tags[f"eval.{key}"])


def gate(
    client: MlflowClient, name: str, version: str, metric: str, margin: float, require_ci: bool = True
) -> tuple[bool, str]:
    """Whether ``version`` may become champion, and why.

    Refused when its evaluation was flagged (reward hacking guard). With no champion, it must beat
    the base policy (with ``require_ci``: the CI of the difference above zero). With a champion,
    it must beat it on ``metric`` by more than ``margin``, using the paired evaluation against that
    champion when there is one (``eval.vs_champion.*`` tags: same scenarios, same seeds), with
    ``require_ci`` its CI above zero; without that evaluation, the stored metrics are compared, and
    ``require_ci`` refuses, since there is no CI to check."""
    candidate = client.get_model_version(name, version)
    if candidate.tags.get("eval.flagged") == "true":
        return False, f"evaluation flagged: {candidate.tags.get('eval.flags', '')}"
    champion = by_alias(client, name, "champion")
    if champion is None:
        diff, low = tag(candidate, "vs_base.mean"), tag(candidate, "vs_base.ci_low")
        ok = diff > margin and (low > 0 or not require_ci)
        return ok, f"no champion yet; against the base: {metric} diff {diff:+.4f}, CI low {low:+.4f}"
    if str(champion.version) == str(version):
        return False, f"version {version} is already the champion"
    if candidate.tags.get("eval.vs_champion.version") == str(champion.version):
        diff, low = tag(candidate, "vs_champion.mean"), tag(candidate, "vs_champion.ci_low")
        ok = diff > margin and (low > 0 or not require_ci)
        return ok, (
            f"paired against champion v{champion.version}: {metric} diff {diff:+.4f} (margin {margin}), "
            f"CI low {low:+.4f}{' (must be > 0)' if require_ci else ''}: {'passes' if ok else 'refused'}"
        )
    score, best = tag(candidate, metric), tag(champion, metric)
    ok = score > best + margin and not require_ci
    return ok, (
        f"{metric} {score:.4f} vs champion v{champion.version} {best:.4f} from separate evaluations"
        + (
            "; no paired evaluation against this champion, so no CI: rerun evaluate"
            if require_ci
            else f": {'beats' if ok else 'does not beat'} it by more than {margin}"
        )
    )


def record(client: MlflowClient, name: str, version: str, decision: str, reason: str, by: str) -> None:
    tags = {
        "promotion.decision": decision,
        "promotion.reason": reason,
        "promotion.by": by,
        "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    metric: str,
    margin: float,
    by: str,
    require_ci: bool = True,
    automatic: bool = False,
) -> dict:
    """Move ``champion`` to ``version`` if it passes the gate. ``automatic`` (the register stage)
    also refuses a version that was rolled back: only a person promotes it again."""
    champion = by_alias(client, name, "champion")
    if champion is not None and str(champion.version) == str(version):  # nothing to decide, nothing recorded
        return {"promoted": False, "version": str(version), "reason": f"version {version} is already the champion"}
    ok, reason = gate(client, name, version, metric, margin, require_ci)
    if ok and automatic and client.get_model_version(name, str(version)).tags.get("rolled_back") == "true":
        ok, reason = (
            False,
            (
                f"refused: version {version} was rolled back; promote it by hand if you mean it "
                f"(grpo-agents promote --version {version})"
            ),
        )
    if not ok:
        record(client, name, version, "refused", reason, by)
        return {"promoted": False, "version": str(version), "reason": reason}
    old = by_alias(client, name, "champion")
    if old is not None:
        client.set_model_version_tag(name, str(old.version), "previous_champion", "true")
        client.set_model_version_tag(name, str(version), "promotion.replaced", str(old.version))
    client.set_registered_model_alias(name, "champion", str(version))
    if client.get_model_version(name, str(version)).tags.get("rolled_back"):  # promoted again, by hand
        client.delete_model_version_tag(name, str(version), "rolled_back")
    record(client, name, version, "promoted", reason, by)
    return {"promoted": True, "version": str(version), "replaced": str(old.version) if old else None, "reason": reason}


def rollback(client: MlflowClient, name: str, by: str) -> dict:
    current = by_alias(client, name, "champion")
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    previous = current.tags.get("promotion.replaced")
    if not previous:
        raise RegistryError(f"{name} champion v{current.version} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, "champion", previous)
    client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    record(client, name, previous, "restored by rollback", f"rolled back from v{current.version}", by)
    return {"champion": previous, "rolled_back": str(current.version)}


def promote_version(client: MlflowClient, register: RegisterParams, version: str | None, by: str) -> dict:
    """Promote ``version`` (default: the challenger) of ``register.model_name`` if it passes the gate."""
    version = version_or_challenger(client, register.model_name, version)
    return promote(
        client, register.model_name, version, register.metric, register.min_improvement, by, register.require_ci
    )


def log_pyfunc(
    name: str,
    registered_name: str,
    python_model: str,
    artifacts: dict,
    model_config: dict,
    example: list[dict],
    requirements: tuple[str, ...],
    tags: dict,
) -> str:
    """Log a models-from-code pyfunc with the ``grpo`` library as its code, register it under
    ``registered_name`` with ``tags`` and the alias ``challenger``, and return its version.

    The version and its tags are created in one registry transaction (``register_model`` with
    ``tags``; ``log_model(registered_model_name=...)`` would tag it afterwards): a process killed
    in between leaves no version without the ``inputs_sha256`` tag by which a rerun finds it."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(HERE / python_model),
        artifacts=artifacts,
        code_paths=["grpo"],
        model_config=model_config,
        input_example=pd.DataFrame({"messages": [example]}),
        pip_requirements=[f"{r}=={md.version(r)}" for r in requirements],
    )
    tags = {k: str(v) for k, v in tags.items()}
    version = str(mlflow.register_model(info.model_uri, registered_name, tags=tags).version)
    MlflowClient().set_registered_model_alias(registered_name, "challenger", version)
    return version


def log_agent(name: str, policy_dir: str, device: str, tags: dict) -> str:
    """Register the policy as the agent pyfunc (agent_pyfunc.py) with ``tags``; returns its version."""
    config = {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "device": device}
    return log_pyfunc("agent", name, "agent_pyfunc.py", {"policy": policy_dir}, config, EXAMPLE, REQUIREMENTS, tags)


def log_reward_model(name: str, model_dir: str, device: str, tags: dict) -> str:
    """Register the reward model as its own pyfunc (reward_pyfunc.py) with ``tags``; returns its version."""
    example = [*EXAMPLE, {"role": "assistant", "content": "Let me check."}]
    return log_pyfunc(
        "reward_model",
        name,
        "reward_pyfunc.py",
        {"reward_model": model_dir},
        {"device": device},
        example,
        (*REQUIREMENTS, "sentence-transformers"),
        tags,
    )


def alias_loader(client: MlflowClient, name: str, alias: str, device: str):
    """``(load, current_version, state)`` for the server (grpo/serving.py): ``load()`` resolves the
    alias now and loads that version's policy; ``current_version()`` asks the registry again."""
    state = {"version": None}

    def current_version() -> str:
        return str(client.get_model_version_by_alias(name, alias).version)

    def load():
        from grpo.models import load_policy

        version = current_version()
        model, tokenizer = load_policy(download_policy(name, version), device)
        state["version"] = version
        log.info("loaded %s version %s (alias %s)", name, version, alias)
        return model, tokenizer, f"{name}@{alias}:v{version}"

    return load, current_version, state


def watch_alias(server, current_version, state: dict, every: float) -> None:
    """Reload ``server`` whenever the alias points at another version than the one loaded."""
    while True:
        time.sleep(every)
        try:
            if current_version() != state["version"]:
                server.reload()
        except Exception:  # a registry hiccup must not kill the watcher; logged, retried next tick
            log.exception("alias check failed")
