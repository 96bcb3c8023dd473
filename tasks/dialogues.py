"""Turn a transcript into context/response samples for one character, split by episode."""

import random

import pandas as pd
from prefect import task

from castbot.config import DialogueConfig
from tasks.errors import DataError


def samples_for(frame: pd.DataFrame, character: str, context_turns: int) -> list[dict]:
    """One sample per line of the character; context = previous lines of the same episode and scene."""
    samples = []
    for (episode, _scene), turns in frame.groupby(["episode", "scene"], sort=False, dropna=False):
        lines, speakers = turns["line"].tolist(), turns["speaker"].tolist()
        for i, speaker in enumerate(speakers):
            if speaker != character:
                continue
            context = lines[max(0, i - context_turns) : i] if context_turns else []
            samples.append({"episode": str(episode), "context": context, "response": lines[i]})
    return samples


def split_episodes(episodes: list[str], config: DialogueConfig, seed: int) -> dict[str, set[str]]:
    """Seeded episode split; each split gets at least one episode."""
    unique = sorted(set(episodes))
    if len(unique) < 3:
        raise DataError(
            f"only {len(unique)} episode(s) hold the character's lines; train/validation/test are split by "
            "episode (a row split leaks context into the test set), so at least 3 are needed"
        )
    random.Random(seed).shuffle(unique)
    n_test = max(1, round(len(unique) * config.test_fraction))
    n_val = max(1, round(len(unique) * config.val_fraction))
    return {
        "test": set(unique[:n_test]),
        "validation": set(unique[n_test : n_test + n_val]),
        "train": set(unique[n_test + n_val :]),
    }


@task(name="build-dialogues")
def build_dialogues(frame: pd.DataFrame, character: str, config: DialogueConfig, seed: int) -> dict[str, list[dict]]:
    """Samples for the character, split train/validation/test by episode (no episode in two splits)."""
    frame = frame.assign(scene=frame["scene"].fillna("").astype(str))
    samples = samples_for(frame, character, config.context_turns)
    if not samples:
        raise DataError(f"character '{character}' has no lines to learn from")
    splits = split_episodes([s["episode"] for s in samples], config, seed)
    return {name: [s for s in samples if s["episode"] in episodes] for name, episodes in splits.items()}
