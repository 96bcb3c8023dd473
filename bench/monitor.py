"""The monitor's cost on a large window and its drift decision on real traffic.

    .venv/bin/python -m bench.monitor [--turns 100000] [--draws 8]

1. Time: `turns` synthetic logged turns (messages from held-out Rick and Morty episodes and Friends, replies from
   Rick's lines, a few errors, cancelled streams and ratings) written to a SQLite chat log, read back with
   `ChatLog.turns` and checked with every check of the monitor (tasks/drift.window_checks). Goal: under a minute
   on 2 cores. The drift classifier sees a seeded sample of monitor.classifier_cap messages (it says so).
2. Decision: the Rick reference (the clean file's training episodes, as tasks/reference.build_reference stores it)
   against `draws` seeded samples of 30, 50 and 100 user-side lines of held-out Rick episodes (in distribution),
   LOTR and Friends (other shows) and chatterbot's Spanish corpus (another language): AUC and threshold per draw.
Reads ../shared/data (the repository's tests expect it there).
"""

import argparse
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from castbot.config.monitor import MonitorConfig
from castbot.config.profile import load_profile


def splits_of(profile: str):
    from tasks.data.clean import clean_transcript
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript

    config = load_profile(profile)
    cleaned, _ = clean_transcript.fn(load_transcript.fn(config.data), config.cleaning)
    return config, cleaned, build_dialogues.fn(cleaned, config.character, config.dialogue, config.training.seed)


def synthetic_turns(n: int, messages: list[str], replies: list[str], seed: int) -> pd.DataFrame:
    """n logged turns in chat log columns: 2% errors, 5% cancelled, 10% rated (80% up), latencies 0.2-3 s."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    reasons = rng.choice(["stop", "length", "error", "cancelled"], size=n, p=[0.83, 0.10, 0.02, 0.05])
    ratings = np.where(rng.random(n) < 0.1, np.where(rng.random(n) < 0.8, 1.0, -1.0), np.nan)
    return pd.DataFrame({
        "turn_id": [uuid.uuid4().hex for _ in range(n)], "conversation_id": [uuid.uuid4().hex for _ in range(n)],
        "time": pd.to_datetime([now - timedelta(seconds=float(s)) for s in rng.uniform(0, 3600, n)], utc=True),
        "endpoint": "chat",
        "message": rng.choice(messages, n), "reply": rng.choice(replies, n), "history_turns": 2,
        "model_name": "rick-bot", "model_version": "1", "character": "Rick", "engine": "continuous",
        "prompt_tokens": 60, "new_tokens": 20, "latency_s": rng.uniform(0.2, 3.0, n), "ttft_s": np.nan,
        "finish_reason": reasons, "rating": ratings,
        "client": [f"client-{i}" for i in rng.integers(0, 50, n)], "history": "[]"})


def write_log(turns: pd.DataFrame, url: str) -> float:
    """Seconds to bulk-insert the turns and their ratings into a new chat log, in one transaction through the
    log's own tables (ChatLog.record commits each turn: 100k of them would time the log, not the monitor)."""
    from castbot.chatlog.store import TURN_FIELDS, ChatLog, feedback_table, turns_table

    log, started = ChatLog(url), time.perf_counter()
    rows = turns[TURN_FIELDS].assign(time=turns["time"].dt.tz_convert(None)).to_dict("records")
    rated = turns[turns["rating"].notna()]
    ratings = [{"turn_id": t, "rating": int(r), "comment": None,
                "time": datetime.now(UTC).replace(tzinfo=None)}
               for t, r in zip(rated["turn_id"], rated["rating"])]
    with log.engine.begin() as conn:
        conn.execute(turns_table.insert(), rows)
        conn.execute(feedback_table.insert(), ratings)
    return time.perf_counter() - started


def time_monitor(reference: dict, turns: pd.DataFrame) -> None:
    from castbot.chatlog.store import ChatLog
    from castbot.scores.drift import window_checks

    url = f"sqlite:///{tempfile.mkdtemp(prefix='castbot-bench-')}/chatlog.db"
    print(f"writing {len(turns)} turns to {url}: {write_log(turns, url):.1f} s (not part of the monitor)")
    started = time.perf_counter()
    turns = ChatLog(url).turns("rick-bot", since=datetime.now(UTC) - timedelta(hours=2))
    read = time.perf_counter() - started
    print(f"read {len(turns)} turns back with ChatLog.turns: {read:.1f} s")
    started = time.perf_counter()
    checks = window_checks(reference, turns, MonitorConfig())
    checked = time.perf_counter() - started
    for check in checks:
        print("  " + check.line())
    print(f"monitor on {len(turns)} turns: checks {checked:.1f} s, read + checks {read + checked:.1f} s")


def decisions(reference: dict, pools: dict[str, list[str]], draws: int) -> None:
    from castbot.scores.drift import domain_classifier_drift

    monitor = MonitorConfig()
    print(f"\ndrift decisions (threshold = max(permutation {monitor.permutation_quantile:.0%} of "
          f"{monitor.permutations}, floor {monitor.min_drift_auc})), {draws} draws each:")
    for name, pool in pools.items():
        for n in (30, 50, 100):
            results = [domain_classifier_drift(reference["contexts"], random.Random(s).sample(pool, min(n, len(pool))),
                                               monitor.classifier_cap, monitor.permutations,
                                               monitor.permutation_quantile, monitor.min_drift_auc, s)
                       for s in range(draws)]
            aucs = [r["auc"] for r in results]
            print(f"  {name:10s} {n:4d} turns: drift in {sum(r['drift'] for r in results)}/{draws}, AUC "
                  f"{min(aucs):.2f}-{max(aucs):.2f} (median {np.median(aucs):.2f}), thresholds "
                  f"{min(r['threshold'] for r in results):.2f}-{max(r['threshold'] for r in results):.2f}")


def main(argv: list[str] | None = None) -> None:
    from tasks.data.ingest import read_chatterbot
    from tasks.release.trained_on import build_reference, user_side

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100000)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args(argv)
    config, _, splits = splits_of("configs/rick-and-morty.yaml")
    reference = build_reference(splits, config.character, 2000, seed=0)
    held_out = [t for name in ("validation", "test") for t, _ in user_side(splits[name], config.character)]
    pools = {"rick": held_out,
             "lotr": splits_of("configs/lotr.yaml")[1]["line"].astype(str).tolist(),
             "friends": splits_of("configs/friends.yaml")[1]["line"].astype(str).tolist(),
             "spanish": read_chatterbot("chatterbot:spanish")["line"].astype(str).tolist()}
    print(f"reference: {len(reference['contexts'])} Rick training contexts, {len(reference['character_lines'])} "
          f"Rick lines, held-out OOV {reference['oov_baseline']:.3f}")
    time_monitor(reference, synthetic_turns(args.turns, held_out + pools["friends"][:2000],
                                            reference["character_lines"], seed=0))
    decisions(reference, pools, args.draws)


if __name__ == "__main__":
    main()
