"""Stage 1, prepare: seed scenarios, their seeded expansion and the user's imports, deduplicated,
validated with Great Expectations and split into train/eval with no scenario family on both sides.

Reads `paths.scenarios` (hand-written seeds), `prepare.sources` (imports, see grpo/imports.py) and
the GX suite at `paths.expectations`; writes `paths.prepared`/{train,eval}.parquet, validation.json
(the GX report) and report.json (counts: expanded, imported, near-duplicates dropped, PII masked).
A failed validation exits non-zero, names the files, ids and expectations, logs the GX report to
MLflow, and leaves the previous prepared data untouched.
"""

from __future__ import annotations

import logging
from collections import Counter

import pandas as pd

from grpo import scenarios
from grpo.expand import expand, multi_issue, near_duplicates
from grpo.imports import import_source
from grpo.io import atomic_path, write_json
from grpo.reward_model import load_encoder
from grpo.validation import ValidationFailed, validate
from grpo_agents.params import Paths, PrepareParams
from mlflow_io.tracking import log_dict, log_metrics, set_tag

log = logging.getLogger(__name__)


def run(prepare: PrepareParams, seed: int, encoder: str, paths: Paths) -> dict:
    seeds = scenarios.load_dir(paths.scenarios)
    expansion = prepare.expand
    singles = expand(seeds, seed, expansion.tones, expansion.order_states, expansion.products)
    pii: Counter = Counter()
    imported = []
    for source in prepare.sources:
        scen, counts = import_source(source, prepare.mask_pii)
        log.info("imported %d scenarios from %s (PII masked: %s)", len(scen), source["path"], dict(counts))
        imported += scen
        pii.update(counts)

    train, evaluation = scenarios.split(scenarios.to_frame(singles + imported), prepare.eval_fraction, seed)
    seed_ids = {s.id for s in seeds}
    per_side = {
        "train": expansion.multi_issue_per_domain,
        "eval": round(expansion.multi_issue_per_domain * prepare.eval_fraction),
    }
    combos = {
        side: multi_issue([s for s in scenarios.from_frame(df) if s.id in seed_ids], seed, per_side[side])
        for side, df in (("train", train), ("eval", evaluation))
    }
    everything = scenarios.to_frame(
        scenarios.from_frame(train) + combos["train"] + scenarios.from_frame(evaluation) + combos["eval"]
    )
    try:
        report = validate(everything, paths.expectations)
    except ValidationFailed as e:
        log_dict(e.report, "validation.json")
        set_tag("validation", "failed")
        raise

    sentence_encoder = load_encoder(encoder)
    kept, dropped = near_duplicates(
        scenarios.from_frame(everything),
        lambda t: sentence_encoder.encode(t, batch_size=64, show_progress_bar=False),
        prepare.dedup_threshold,
    )
    kept_ids = {s.id for s in kept}
    train = train[train["id"].isin(kept_ids)]
    evaluation = evaluation[evaluation["id"].isin(kept_ids)]
    train = pd.concat([train, scenarios.to_frame([c for c in combos["train"] if c.id in kept_ids])], ignore_index=True)
    evaluation = pd.concat(
        [evaluation, scenarios.to_frame([c for c in combos["eval"] if c.id in kept_ids])], ignore_index=True
    )
    leaked = scenarios.leaked_families(train, evaluation)
    if leaked:
        raise ValueError(f"scenario families on both sides of the split: {', '.join(leaked)}")

    summary = {
        "scenarios": len(train) + len(evaluation),
        "train": len(train),
        "eval": len(evaluation),
        "seeds": len(seeds),
        "expanded": len(singles) - len(seeds),
        "imported": len(imported),
        "multi_issue": sum(c.id in kept_ids for side in combos.values() for c in side),
        "near_duplicates_dropped": len(dropped),
        "expectations": report["evaluated"],
        "validation_success": int(report["success"]),
        **{f"pii_masked_{k}": pii[k] for k in ("email", "phone", "card")},
    }
    by_domain = pd.concat([train.assign(split="train"), evaluation.assign(split="eval")])
    per_domain = by_domain.groupby(["domain", "split"]).size().unstack(fill_value=0).to_dict("index")
    details = {**summary, "per_domain": per_domain, "dropped": dropped}
    with atomic_path(paths.prepared, is_dir=True) as tmp:
        train.to_parquet(tmp / "train.parquet", index=False)
        evaluation.to_parquet(tmp / "eval.parquet", index=False)
        write_json(tmp / "validation.json", report)
        write_json(tmp / "report.json", details)
    log_metrics(summary)
    log_dict(report, "validation.json")
    log_dict(details, "prepare_report.json")
    return summary


if __name__ == "__main__":
    from grpo_agents.stages import main

    main("prepare")
