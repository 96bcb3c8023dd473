"""Lines/s of each data stage on a profile's transcript (default: Friends, 67k lines).

    .venv/bin/python -m bench.data_throughput [configs/friends.yaml]

Runs the task bodies (`.fn`) in order, as the flow does, without Prefect's per-task overhead; the
GX import (4-6 s) is timed apart from the first validation. Goal: ingest -> tokenised <= 60 s on 2 cores.
"""

import sys
import tempfile
import time

from castbot.config import load_profile


def timed(results: list, stage: str, lines: int, fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    results.append((stage, lines, time.perf_counter() - start))
    return value


def main(profile: str = "configs/friends.yaml") -> None:
    from flows.train import training_texts
    from tasks.base_model import prepare_base_model
    from tasks.clean import clean_transcript
    from tasks.dialogues import build_dialogues
    from tasks.ingest import load_transcript
    from tasks.tokenize import tokenize_dialogues
    from tasks.validate import validate_dialogue, validate_raw

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


if __name__ == "__main__":
    main(*sys.argv[1:])
