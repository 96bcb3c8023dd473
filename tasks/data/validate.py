"""Validate transcripts against the Great Expectations suites in expectations/, with Data Docs for each run.

raw_transcript: the file's structure after ingest (columns, types, row count, null share).
dialogue: the cleaned lines (lengths, leftover markup, the character's lines and episodes; a cast: each member's).
"""

import difflib
import json
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.common.errors import DataError
from castbot.config.data import ValidationConfig
from tasks.data.clean import LEFTOVER_MARKUP
from tasks.data.lineage import publish_markdown

SUITES = Path(__file__).resolve().parents[2] / "expectations"
SHOWN_ROWS = 3  # offending rows quoted per failed expectation


def load_suite(name: str, substitutions: dict[str, str], each: dict[str, list[str]] | None = None):
    """The suite from expectations/NAME.json with ${key} placeholders in string kwargs filled in. each maps a
    placeholder to several values: an expectation that holds it is checked once per value (a cast's members)."""
    import great_expectations as gx

    raw = json.loads((SUITES / f"{name}.json").read_text(encoding="utf-8"))
    expectations = []
    for expectation in raw["expectations"]:
        texts = [value for value in expectation["kwargs"].values() if isinstance(value, str)]
        repeated = [key for key in each or {} if any(f"${{{key}}}" in text for text in texts)]
        for values in ([{key: value} for key in repeated for value in each[key]] or [{}]):
            expectations.append(_filled(expectation, {**substitutions, **values}))
    return gx.ExpectationSuite(**{**raw, "expectations": expectations})


def _filled(expectation: dict, substitutions: dict[str, str]) -> dict:
    """A copy of the expectation with ${key} in its string kwargs replaced."""
    kwargs = dict(expectation["kwargs"])
    for key, value in kwargs.items():
        if isinstance(value, str):
            for placeholder, text in substitutions.items():
                value = value.replace(f"${{{placeholder}}}", text)
            kwargs[key] = value
    return {**expectation, "kwargs": kwargs}


def run_suite(frame: pd.DataFrame, suite, parameters: dict, docs_dir: str | None = None):
    """Validate frame in an ephemeral GX context; with docs_dir, also build Data Docs (HTML) there."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = context.data_sources.add_pandas("castbot").add_dataframe_asset(suite.name)
    definition = batch.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(suite)
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=definition,
                                                                              suite=suite))
    actions = []
    if docs_dir:
        site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir}}
        context.add_data_docs_site("castbot", site)
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs", site_names=["castbot"])]
    checkpoint = context.checkpoints.add(gx.Checkpoint(name=suite.name, validation_definitions=[validation],
                                                       actions=actions, result_format="SUMMARY"))
    frame = frame.astype({"speaker": object, "line": object})  # so types are checked value by value
    result = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
    return next(iter(result.run_results.values()))


def _cut(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(str(value)):,} chars)"


def describe_failures(result, frame: pd.DataFrame) -> list[str]:
    """One line per failed expectation: type, column or condition, observed value, a few offending rows."""
    lines = []
    for item in result.results:
        if item.success:
            continue
        config, found = item.expectation_config, item.result
        where = config.kwargs.get("column") or ""
        condition = config.kwargs.get("row_condition")
        if condition:
            condition = condition.get("pass_through_filter", condition) if isinstance(condition, dict) else condition
            where = f"{where} where {condition}".strip()
        observed = found.get("observed_value")
        if observed is None and "unexpected_count" in found:
            observed = f"{found['unexpected_count']:,} of {found['element_count']:,} rows"
            rows = found.get("partial_unexpected_index_list") or []
            column = config.kwargs.get("column")
            shown = [f"row {i}: {frame.at[i, 'speaker']!s}: {_cut(frame.at[i, column])}" for i in rows[:SHOWN_ROWS]]
            observed += f", e.g. {'; '.join(shown)}" if shown else ""
        setting = (config.meta or {}).get("setting")  # the profile key behind the threshold, from the suite
        limit = f" (limit set by {setting})" if setting else ""
        lines.append(f"{config.type} [{where}]: observed {observed}{limit}")
    return lines


def publish_validation(name: str, source: str, result, docs_dir: str) -> str:
    """A Prefect markdown artifact with the outcome and a file:// link to the Data Docs; returns the index path."""
    index = Path(docs_dir) / "index.html"
    stats = result.statistics
    publish_markdown(
        f"# Validation `{name}`: {'passed' if result.success else 'FAILED'}\n\n"
        f"`{source}`: {stats['successful_expectations']} of {stats['evaluated_expectations']} expectations met.\n\n"
        f"[Great Expectations Data Docs]({index.as_uri()}) (`{index}`)\n",
        key=f"validation-{name.replace('_', '-')}", description=f"GX suite {name} on {source}")
    return str(index)


def _check(frame: pd.DataFrame, name: str, substitutions: dict, parameters: dict, source: str, docs_dir: str,
           hint: str = "", each: dict[str, list[str]] | None = None) -> dict:
    result = run_suite(frame, load_suite(name, substitutions, each), parameters, str(Path(docs_dir) / name))
    index = publish_validation(name, source, result, str(Path(docs_dir) / name))
    if not result.success:
        failures = "\n  ".join(describe_failures(result, frame))
        raise DataError(f"{source}: the {name} checks failed:\n  {failures}{hint}\n  Data Docs: {index}\n"
                        "  Fix the file, or the thresholds in the profile's `validation` section.")
    return {**dict(result.statistics), "data_docs": index}


@task(name="validate_raw")
def validate_raw(frame: pd.DataFrame, source: str, rules: ValidationConfig, docs_dir: str) -> dict:
    """The raw file's structure (suite raw_transcript); fails listing every failed expectation."""
    parameters = {"min_rows": rules.min_rows, "not_null_share": 1.0 - rules.max_null_fraction,
                  "max_raw_line_chars": rules.max_raw_line_chars}
    return _check(frame, "raw_transcript", {}, parameters, source, docs_dir)


def character_hint(frame: pd.DataFrame, character: str) -> str:
    """Who speaks most, and labels close to the character's name (candidates for cleaning.aliases)."""
    counts = frame["speaker"].value_counts()
    top = ", ".join(f"{name} ({n})" for name, n in counts.head(6).items())
    close = difflib.get_close_matches(character, list(counts.index), n=4, cutoff=0.6)
    close += [s for s in counts.index[:200] if character.casefold() in s.casefold() and s not in close][:4]
    hint = f"\n  character '{character}' speaks {int(counts.get(character, 0))} line(s); most lines: {top}"
    if close:
        hint += f"\n  similar labels: {close}; set `character` or merge them with cleaning.aliases"
    return hint


@task(name="validate_dialogue")
def validate_dialogue(frame: pd.DataFrame, source: str, character: str | list[str], rules: ValidationConfig,
                      docs_dir: str) -> dict:
    """The cleaned dialogue (suite dialogue): lengths, leftover markup, the character's lines and episodes; for a
    cast (a list of names), every member's lines and episodes, a failure naming the member."""
    parameters = {"max_line_chars": rules.max_line_chars, "no_markup_share": 1.0 - rules.max_markup_share,
                  "min_character_lines": rules.min_character_lines,
                  "min_character_episodes": rules.min_character_episodes}
    cast = [character] if isinstance(character, str) else list(character)
    substitutions = {"leftover_markup": LEFTOVER_MARKUP}
    each = {"character": [json.dumps(name) for name in cast]}
    hint = ""
    for name in cast:
        spoken = frame[frame["speaker"] == name]
        if len(spoken) < rules.min_character_lines or spoken["episode"].nunique() < rules.min_character_episodes:
            hint += character_hint(frame, name)
    return _check(frame, "dialogue", substitutions, parameters, source, docs_dir, hint, each)
