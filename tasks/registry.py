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


def metric_of(version, metric: str) -> float:
    key = f"eval.{metric}"
    if key not in version.tags:
        raise RegistryError(f"version {version.version} has no tag {key!r}; was it registered by the pipeline?")
    return float(version.tags[key])


def gate(client: MlflowClient, name: str, version: str, metric: str, margin: float) -> tuple[bool, str]:
    """Pass when there is no champion, or ``version`` beats it on ``metric`` by more than ``margin``."""
    candidate = client.get_model_version(name, version)
    score = metric_of(candidate, metric)
    champion = by_alias(client, name, "champion")
    if champion is None:
        return True, f"no champion yet; {metric} {score:.4f}"
    if str(champion.version) == str(version):
        return False, f"version {version} is already the champion"
    best = metric_of(champion, metric)
    ok = score > best + margin
    return ok, (f"{metric} {score:.4f} vs champion v{champion.version} {best:.4f}: "
                f"{'beats' if ok else 'does not beat'} it by more than {margin}")


def record(client: MlflowClient, name: str, version: str, decision: str, reason: str, by: str) -> None:
    tags = {"promotion.decision": decision, "promotion.reason": reason, "promotion.by": by,
            "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def promote(client: MlflowClient, name: str, version: str, metric: str, margin: float, by: str) -> dict:
    ok, reason = gate(client, name, version, metric, margin)
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
            result = promote(client, name, version, p["metric"], p["min_improvement"], "cli promote")
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
