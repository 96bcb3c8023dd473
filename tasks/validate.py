"""Validate a transcript against a Great Expectations suite kept as JSON in expectations/."""

import json
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.config import ValidationConfig
from tasks.errors import DataError

SUITES = Path(__file__).resolve().parent.parent / "expectations"


def load_suite(name: str, character: str):
    """The suite from expectations/NAME.json with the target character filled into row conditions."""
    import great_expectations as gx

    raw = json.loads((SUITES / f"{name}.json").read_text(encoding="utf-8"))
    for expectation in raw["expectations"]:
        kwargs = expectation["kwargs"]
        if "row_condition" in kwargs:
            kwargs["row_condition"] = kwargs["row_condition"].replace("${character}", json.dumps(character))
    return gx.ExpectationSuite(**raw)


def run_suite(frame: pd.DataFrame, suite, parameters: dict):
    """Validate frame with suite in an ephemeral GX context; returns the suite validation result."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    asset = context.data_sources.add_pandas("castbot").add_dataframe_asset("transcript")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(suite, expectation_parameters=parameters, result_format="SUMMARY")


def describe_failures(result) -> list[str]:
    """One line per failed expectation: its type, column or condition, and what was observed."""
    lines = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        where = config.kwargs.get("column") or ""
        condition = config.kwargs.get("row_condition")
        if condition:
            where = f"rows where {condition.get('pass_through_filter', condition) if isinstance(condition, dict) else condition}"
        observed = item.result.get("observed_value")
        if observed is None and "unexpected_count" in item.result:
            examples = item.result.get("partial_unexpected_list", [])[:3]
            observed = f"{item.result['unexpected_count']} bad rows, e.g. {examples}"
        lines.append(f"{config.type} [{where}]: observed {observed}")
    return lines


@task(name="validate")
def validate_transcript(frame: pd.DataFrame, source: str, character: str, rules: ValidationConfig) -> dict:
    """Fail with every failed expectation listed; return the validation statistics on success."""
    parameters = {
        "min_rows": rules.min_rows,
        "not_null_share": 1.0 - rules.max_null_fraction,
        "max_line_chars": rules.max_line_chars,
        "min_character_lines": rules.min_character_lines,
    }
    result = run_suite(frame, load_suite("transcript", character), parameters)
    if not result.success:
        failures = "\n  ".join(describe_failures(result))
        if not (frame["speaker"] == character).any():
            speakers = ", ".join(frame["speaker"].value_counts().index[:8].map(str))
            failures += f"\n  character '{character}' never speaks; most frequent speakers: {speakers}"
        raise DataError(f"{source}: validation failed for character '{character}':\n  {failures}")
    return dict(result.statistics)
