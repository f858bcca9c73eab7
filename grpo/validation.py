"""Great Expectations suite for prepared scenarios.

GX validates columns, so list fields are summarised into derived columns (``n_followups``,
``min_turn_chars`` ...) before validation. ``great_expectations`` takes ~3 s to import, so it is
imported inside :func:`validate` only.
"""

from __future__ import annotations

import pandas as pd

from grpo.scenarios import DIFFICULTIES, DOMAINS


class ValidationFailed(ValueError):
    def __init__(self, report: dict):
        self.report = report
        lines = [f"scenario validation failed: {report['failed']} of {report['evaluated']} expectations"]
        for f in report["failures"]:
            lines.append(f"  - {f['expectation']} on {f['column']!r}: ids {f['ids']} (from {', '.join(f['files'])})")
        super().__init__("\n".join(lines))


def derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    turns = out.apply(lambda r: [r["opening"], *r["followups"]], axis=1)
    out["n_followups"] = out["followups"].map(len)
    out["n_keywords"] = out["keywords"].map(len)
    out["n_behaviours"] = out["expected_behaviours"].map(len)
    out["min_turn_chars"] = turns.map(lambda t: min(len(x.strip()) for x in t))
    out["max_turn_chars"] = turns.map(lambda t: max(len(x) for x in t))
    return out


def build_suite(gx, bounds: dict):
    E = gx.expectations
    suite = gx.ExpectationSuite(name="scenarios")
    for col in ("id", "domain", "persona", "opening", "difficulty"):
        suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=col))
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="domain", value_set=list(DOMAINS)))
    suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="difficulty", value_set=list(DIFFICULTIES)))
    suite.add_expectation(E.ExpectColumnValueLengthsToBeBetween(column="persona", min_value=bounds["min_chars"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=bounds["min_chars"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="max_turn_chars", max_value=bounds["max_chars"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_followups", min_value=bounds["min_followups"]))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_keywords", min_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="n_behaviours", min_value=1))
    return suite


def validate(df: pd.DataFrame, bounds: dict) -> dict:
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
    result = batch.validate(
        build_suite(gx, bounds),
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
    )
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rows = r.result.get("unexpected_index_list") or []
        ids = sorted({str(x["id"]) if isinstance(x, dict) else str(data.iloc[x]["id"]) for x in rows})
        files = sorted(set(data.loc[data["id"].astype(str).isin(ids), "source"])) if ids else []
        failures.append({"expectation": cfg.type, "column": cfg.kwargs.get("column"), "ids": ids, "files": files})
    report = {
        "success": bool(result.success),
        "evaluated": len(result.results),
        "failed": len(failures),
        "rows": len(df),
        "failures": failures,
        "expectations": [r.expectation_config.type + ":" + str(r.expectation_config.kwargs.get("column")) for r in result.results],
    }
    if not report["success"]:
        raise ValidationFailed(report)
    return report
