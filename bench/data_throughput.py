"""Lines/s of each data stage on a profile's transcript (default: Friends, 67k lines).

    .venv/bin/python -m bench.data_throughput [configs/friends.yaml]
    .venv/bin/python -m bench.data_throughput --rerun [configs/friends.yaml]

Default: runs the task bodies (`.fn`) in order, as the flow does, without Prefect's per-task overhead;
the GX import (4-6 s) is timed apart from the first validation. Goal: ingest -> tokenised <= 60 s on 2 cores.
--rerun: runs the same data steps as a Prefect flow twice, with a fresh result cache, and prints each
task's seconds and state: the second run reuses the cleaned and tokenised data (state Cached).
"""

import os
import sys
import tempfile
import time

from castbot.config.profile import load_profile


def timed(results: list, stage: str, lines: int, fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    results.append((stage, lines, time.perf_counter() - start))
    return value


def main(profile: str = "configs/friends.yaml") -> None:
    from flows.train import training_texts
    from tasks.data.clean import clean_transcript
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript
    from tasks.data.tokenize import tokenize_dialogues
    from tasks.data.validate import validate_dialogue, validate_raw
    from tasks.train.base_model import prepare_base_model

    config = load_profile(profile)
    docs = tempfile.mkdtemp(prefix="castbot-bench-")
    results: list[tuple[str, int, float]] = []
    timed(results, "import great_expectations", 0, __import__, "great_expectations")
    frame = timed(results, "ingest", 0, load_transcript.fn, config.data)
    results[-1] = ("ingest", len(frame), results[-1][2])
    timed(results, "validate raw (GX + Data Docs)", len(frame), validate_raw.fn, frame, config.data.path,
          config.validation, docs)
    cleaned, _ = timed(results, "clean", len(frame), clean_transcript.fn, frame, config.cleaning)
    timed(results, "validate dialogue (GX + Data Docs)", len(cleaned), validate_dialogue.fn, cleaned,
          config.data.path, config.character, config.validation, docs)
    splits = timed(results, "build dialogues", len(cleaned), build_dialogues.fn, cleaned, config.character,
                   config.dialogue, config.training.seed)
    samples = sum(len(s) for s in splits.values())
    base = timed(results, "base tokenizer (offline-tiny; cached on rerun)", samples, prepare_base_model.fn,
                 config.base_model, training_texts(splits["train"]), config.offline_model, config.training.seed)
    timed(results, "tokenise (samples)", samples, tokenize_dialogues.fn, splits, base, config.dialogue)

    print(f"{profile}: {len(frame):,} raw lines -> {len(cleaned):,} cleaned -> {samples:,} samples for "
          f"{config.character}")
    print(f"{'stage':48} {'lines':>9} {'seconds':>8} {'lines/s':>10}")
    for stage, lines, seconds in results:
        rate = f"{lines / seconds:,.0f}" if lines else "-"
        print(f"{stage:48} {lines:>9,} {seconds:>8.2f} {rate:>10}")
    total = sum(seconds for _, _, seconds in results)
    print(f"{'total, ingest -> tokenised (incl. GX import)':48} {'':>9} {total:>8.2f}   goal <= 60 s")


def rerun(profile: str = "configs/friends.yaml") -> None:
    """The data steps as a flow, twice; the second run should find clean and tokenize in the cache."""
    import flows  # noqa: F401  (project-local Prefect/MLflow state)

    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="castbot-cache-")  # cold start
    from prefect import flow

    from flows.train import training_texts
    from tasks.data.clean import clean_transcript, publish_cleaning_report
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript
    from tasks.data.lineage import report_dir
    from tasks.data.tokenize import tokenize_dialogues
    from tasks.data.validate import validate_dialogue, validate_raw
    from tasks.train.base_model import prepare_base_model

    @flow(name="data-steps")
    def data_steps(config) -> list[tuple[str, float, str]]:
        timings = []

        def step(name, task, *args):
            start = time.perf_counter()
            state = task(*args, return_state=True)
            timings.append((name, time.perf_counter() - start, state.name))
            return state.result()

        reports = report_dir()
        frame = step("ingest", load_transcript, config.data)
        step("validate raw", validate_raw, frame, config.data.path, config.validation, reports)
        cleaned, report = step("clean", clean_transcript, frame, config.cleaning)
        step("publish cleaning report", publish_cleaning_report, report, config.data.path, reports)
        step("validate dialogue", validate_dialogue, cleaned, config.data.path, config.character,
             config.validation, reports)
        splits = step("build dialogues", build_dialogues, cleaned, config.character, config.dialogue,
                      config.training.seed)
        base = step("base model", prepare_base_model, config.base_model, training_texts(splits["train"]),
                    config.offline_model, config.training.seed)
        step("tokenize", tokenize_dialogues, splits, base, config.dialogue)
        return timings

    config = load_profile(profile)
    runs = [data_steps(config) for _ in range(2)]
    print(f"{profile}: the data steps as a Prefect flow, run twice (seconds, state)")
    print(f"{'task':26} {'first run':>22} {'rerun':>22}")
    for (name, first, state1), (_, second, state2) in zip(*runs):
        print(f"{name:26} {first:>8.2f}  {state1:<12} {second:>8.2f}  {state2:<12}")
    total1, total2 = (sum(t for _, t, _ in run) for run in runs)
    print(f"{'total':26} {total1:>8.2f} {'':12} {total2:>8.2f}   saved {total1 - total2:.1f} s "
          f"({1 - total2 / total1:.0%})")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--rerun"]:
        rerun(*args[1:])
    else:
        main(*args)
