"""The model registry's decisions: the promotion gate, promote and rollback.

    python -m tasks.registry promote              # the challenger, if it passes the gate
    python -m tasks.registry promote --version 3  # a given version, if it passes the gate
    python -m tasks.registry rollback             # restore the champion that the current one replaced

Aliases, not stages: ``champion`` moves only through :func:`promote`, which tags the old champion
``previous_champion`` and records on the new one which version it replaced, so :func:`rollback`
can restore it. Every decision is written as tags on the version: the metric compared, the margin,
the decision, the reason and who decided. The register stage and the Prefect flows in
``flows/registry.py`` call the same functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.common import load_params, setup_mlflow


class RegistryError(ValueError):
    pass


def by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_or_challenger(client: MlflowClient, name: str, version: str | None) -> str:
    if version is not None:
        return str(version)
    challenger = by_alias(client, name, "challenger")
    if challenger is None:
        raise RegistryError(f"{name} has no challenger; pass a version")
    return str(challenger.version)


def download_policy(mlflow, name: str, version: str, dest: str | None = None) -> str:
    """Local directory of a registered agent version's policy (merged weights + tokenizer)."""
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dest)
    return os.path.join(local, "artifacts", "policy")


def tag(version, key: str) -> float:
    if f"eval.{key}" not in version.tags:
        raise RegistryError(f"version {version.version} has no tag 'eval.{key}'; was it registered by the pipeline?")
    return float(version.tags[f"eval.{key}"])


def gate(client: MlflowClient, name: str, version: str, metric: str, margin: float, require_ci: bool = True) -> tuple[bool, str]:
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
        return ok, (f"paired against champion v{champion.version}: {metric} diff {diff:+.4f} (margin {margin}), "
                    f"CI low {low:+.4f}{' (must be > 0)' if require_ci else ''}: {'passes' if ok else 'refused'}")
    score, best = tag(candidate, metric), tag(champion, metric)
    ok = score > best + margin and not require_ci
    return ok, (f"{metric} {score:.4f} vs champion v{champion.version} {best:.4f} from separate evaluations"
                + ("; no paired evaluation against this champion, so no CI: rerun evaluate" if require_ci else
                   f": {'beats' if ok else 'does not beat'} it by more than {margin}"))


def record(client: MlflowClient, name: str, version: str, decision: str, reason: str, by: str) -> None:
    tags = {"promotion.decision": decision, "promotion.reason": reason, "promotion.by": by,
            "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def promote(client: MlflowClient, name: str, version: str, metric: str, margin: float, by: str,
            require_ci: bool = True) -> dict:
    ok, reason = gate(client, name, version, metric, margin, require_ci)
    if not ok:
        record(client, name, version, "refused", reason, by)
        return {"promoted": False, "version": str(version), "reason": reason}
    old = by_alias(client, name, "champion")
    if old is not None:
        client.set_model_version_tag(name, str(old.version), "previous_champion", "true")
        client.set_model_version_tag(name, str(version), "promotion.replaced", str(old.version))
    client.set_registered_model_alias(name, "champion", str(version))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("promote", help="move champion to a version that passes the gate")
    pr.add_argument("--version", help="version to promote (default: the challenger)")
    sub.add_parser("rollback", help="restore the champion that the current one replaced")
    args = ap.parse_args()
    params = load_params()
    setup_mlflow(params)
    client, name, p = MlflowClient(), params["register"]["model_name"], params["register"]
    try:
        if args.command == "promote":
            version = version_or_challenger(client, name, args.version)
            result = promote(client, name, version, p["metric"], p["min_improvement"], "cli promote", p["require_ci"])
        else:
            result = rollback(client, name, "cli rollback")
    except (RegistryError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(result)
    if args.command == "promote" and not result["promoted"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
