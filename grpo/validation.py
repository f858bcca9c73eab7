"""Great Expectations validation of prepared scenarios, with the suite kept in the repo.

The suite is a JSON file (``paths.expectations``, by default data/expectations/scenarios.json).
GX validates columns, so list fields are summarised into derived columns first (``n_followups``,
``min_turn_chars``, ``n_unknown_tools`` ...). A failure report names, per failed expectation, the
scenario ids and the files they came from. ``great_expectations`` takes ~3 s to import, so it is
imported inside :func:`validate` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from grpo.tools import unresolved


class ValidationFailed(ValueError):
    def __init__(self, report: dict):
        self.report = report
        lines = [f"scenario validation failed: {report['failed']} of {report['evaluated']} expectations"]
        for f in report["failures"]:
            ids = f["ids"][:10] + (["..."] if len(f["ids"]) > 10 else [])
            values = f" values {f['values'][:5]}" if f.get("values") else ""
            lines.append(
                f"  - {f['expectation']} on {f['column']!r}:{values} ids {ids} (from {', '.join(f['files'][:5])})"
            )
        super().__init__("\n".join(lines))


def clip(value, limit: int = 200) -> str:
    """A bad value as an error message shows it: at most ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    turns = out.apply(lambda r: [r["opening"], *r["followups"]], axis=1)
    out["n_followups"] = out["followups"].map(len).astype("int64")
    out["n_expected"] = out["expected_behaviours"].map(len) + out["example_responses"].map(len)
    out["min_turn_chars"] = turns.map(lambda t: min(len(str(x).strip()) for x in t))
    out["max_turn_chars"] = turns.map(lambda t: max(len(str(x)) for x in t))
    refs = out.apply(lambda r: unresolved(list(r["tools"]), json.loads(r["backend"])), axis=1)
    out["n_unknown_tools"] = refs.map(lambda x: len(x[0]))
    out["n_unbacked_tools"] = refs.map(lambda x: len(x[1]))
    return out


def validate(df: pd.DataFrame, suite_path: str | Path) -> dict:
    """Validate scenarios; return a JSON-able report, raise :class:`ValidationFailed` if any fail."""
    import great_expectations as gx

    data = derived_columns(df)
    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("scenarios")
        .add_dataframe_asset("scenarios")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": data})
    )
    suite = gx.ExpectationSuite(**json.loads(Path(suite_path).read_text()))
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]})
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rows = r.result.get("unexpected_index_list") or []
        ids = sorted({str(x["id"]) if isinstance(x, dict) else str(data.iloc[x]["id"]) for x in rows})
        files = sorted(set(data.loc[data["id"].astype(str).isin(ids), "source"].str.split("#").str[0])) if ids else []
        values = list(dict.fromkeys(clip(v) for v in r.result.get("unexpected_list") or []))
        failures.append(
            {"expectation": cfg.type, "column": cfg.kwargs.get("column"), "ids": ids, "files": files, "values": values}
        )
    report = {
        "suite": str(suite_path),
        "success": bool(result.success),
        "evaluated": len(result.results),
        "failed": len(failures),
        "rows": len(df),
        "failures": failures,
        "expectations": [
            r.expectation_config.type + ":" + str(r.expectation_config.kwargs.get("column")) for r in result.results
        ],
    }
    if not report["success"]:
        raise ValidationFailed(report)
    return report
