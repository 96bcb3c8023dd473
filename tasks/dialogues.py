"""Turn a transcript into context/response samples for one character, split by episode."""

import hashlib

import pandas as pd
from prefect import task

from castbot.config import DialogueConfig
from tasks.errors import DataError
from tasks.logs import run_logger


def samples_for(frame: pd.DataFrame, character: str, context_turns: int) -> list[dict]:
    """One sample per line of the character; context = previous lines of the same episode and scene."""
    samples = []
    for (episode, _scene), turns in frame.groupby(["episode", "scene"], sort=False, dropna=False):
        lines, speakers = turns["line"].tolist(), turns["speaker"].tolist()
        for i, speaker in enumerate(speakers):
            if speaker != character:
                continue
            start = max(0, i - context_turns) if context_turns else i
            samples.append({"episode": str(episode), "context": lines[start:i], "speakers": speakers[start:i],
                            "response": lines[i]})
    return samples


def split_episodes(episodes: list[str], config: DialogueConfig, seed: int) -> dict[str, set[str]]:
    """Seeded episode split; each split gets at least one episode.

    Episodes are ordered by a hash of (seed, episode), not shuffled: adding an episode moves at most the
    episodes at a split boundary, so a champion trained on last week's data rarely saw today's test episodes.
    """
    unique = sorted(set(episodes), key=lambda e: hashlib.sha256(f"{seed}:{e}".encode()).hexdigest())
    if len(unique) < 3:
        raise DataError(
            f"only {len(unique)} episode(s) hold the character's lines; train/validation/test are split by "
            "episode (a row split leaks context into the test set), so at least 3 are needed"
        )
    n_test = max(1, round(len(unique) * config.test_fraction))
    n_val = max(1, round(len(unique) * config.val_fraction))
    if n_test + n_val >= len(unique):
        raise DataError(f"{len(unique)} episodes leave none for training with dialogue.test_fraction="
                        f"{config.test_fraction} and dialogue.val_fraction={config.val_fraction}: lower them")
    return {
        "test": set(unique[:n_test]),
        "validation": set(unique[n_test : n_test + n_val]),
        "train": set(unique[n_test + n_val :]),
    }


@task(name="build_dialogues")
def build_dialogues(frame: pd.DataFrame, character: str, config: DialogueConfig, seed: int) -> dict[str, list[dict]]:
    """Samples for the character, split train/validation/test by episode (no episode in two splits)."""
    frame = frame.assign(scene=frame["scene"].fillna("").astype(str))
    samples = samples_for(frame, character, config.context_turns)
    if not samples:
        raise DataError(f"character '{character}' has no lines to learn from")
    splits = split_episodes([s["episode"] for s in samples], config, seed)
    result = {name: [s for s in samples if s["episode"] in episodes] for name, episodes in splits.items()}
    # a (context, response) pair seen in training says nothing about held-out quality: drop it from
    # validation and test (chatterbot-corpus repeats whole conversations across files)
    seen = {(tuple(s["context"]), s["response"]) for s in result["train"]}
    for name in ("validation", "test"):
        kept = [s for s in result[name] if (tuple(s["context"]), s["response"]) not in seen]
        if len(kept) < len(result[name]):
            run_logger("castbot.dialogues").info("dropped %d of %d %s samples that repeat a training sample",
                                  len(result[name]) - len(kept), len(result[name]), name)
        if not kept:
            raise DataError(f"every {name} sample repeats a training sample: nothing is held out")
        result[name] = kept
    return result
