"""Turn a transcript into context/response samples for one character or a cast, split by episode."""

import hashlib
import re
from collections import Counter

import pandas as pd
from prefect import task

from castbot.common.errors import DataError
from castbot.common.logs import run_logger
from castbot.config.data import DialogueConfig


def samples_for(frame: pd.DataFrame, character: str | list[str], context_turns: int) -> list[dict]:
    """One sample per line of the character; context = previous lines of the same episode and scene. A list of
    names (a cast): a sample per line of each, in transcript order, each carrying its speaker as `character`."""
    cast = None if isinstance(character, str) else set(character)
    samples = []
    for (episode, _scene), turns in frame.groupby(["episode", "scene"], sort=False, dropna=False):
        lines, speakers = turns["line"].tolist(), turns["speaker"].tolist()
        for i, speaker in enumerate(speakers):
            if speaker != character if cast is None else speaker not in cast:
                continue
            start = max(0, i - context_turns) if context_turns else i
            sample = {"episode": str(episode), "context": lines[start:i], "speakers": speakers[start:i],
                      "response": lines[i]}
            samples.append(sample if cast is None else {**sample, "character": speaker})
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


def _checkable_lines(frame: pd.DataFrame) -> dict[str, set[str]]:
    """Each episode's distinct lines of 20+ letters (lower case, letters and digits only): short lines such as
    "Oh, man." recur in every episode and say nothing about which episode a transcript holds."""
    keys = frame["line"].fillna("").astype(str).str.lower().map(lambda line: re.sub(r"[^a-z0-9]+", "", line))
    return {str(ep): {k for k in group if len(k) >= 20} for ep, group in keys.groupby(frame["episode"])}


def new_episodes(other: pd.DataFrame, known: pd.DataFrame, max_shared: float = 0.1) -> tuple[pd.DataFrame, list[str]]:
    """The rows of `other` whose episode is not already in `known`, and the episodes left out.

    Two transcripts of one show name episodes differently (a title, a running number), so an episode counts as
    the same when more than `max_shared` of the smaller episode's checkable lines are in both.
    """
    known_lines = _checkable_lines(known)
    seen = {}
    for episode, lines in known_lines.items():
        for line in lines:
            seen.setdefault(line, []).append(episode)
    repeated = []
    for episode, lines in _checkable_lines(other).items():
        shared = Counter(known_episode for line in lines for known_episode in seen.get(line, []))
        if any(n > max_shared * min(len(lines), len(known_lines[e])) for e, n in shared.items()):
            repeated.append(episode)
    return other[~other["episode"].astype(str).isin(repeated)], repeated


@task(name="build_dialogues")
def build_dialogues(frame: pd.DataFrame, character: str | list[str], config: DialogueConfig, seed: int,
                    more: dict[str, pd.DataFrame] | None = None) -> dict[str, list[dict]]:
    """Samples for the character (a list: for every cast member, each sample naming its `character`), split
    train/validation/test by episode (no episode in two splits, for every cast member alike).

    `more` maps a source name to another cleaned transcript of the same show: its episodes that `frame` does
    not hold are added to training only, so validation and test stay this transcript's.
    """
    frame = frame.assign(scene=frame["scene"].fillna("").astype(str))
    samples = samples_for(frame, character, config.context_turns)
    silent = [name for name in ([character] if isinstance(character, str) else character)
              if not any(s.get("character", character) == name for s in samples)]
    if silent:
        raise DataError(f"character '{silent[0]}' has no lines to learn from")
    # one split of the pooled samples' episodes: a cast member's test episode is no one's training episode
    splits = split_episodes([s["episode"] for s in samples], config, seed)
    result = {name: [s for s in samples if s["episode"] in episodes] for name, episodes in splits.items()}
    for source, other in (more or {}).items():
        kept, repeated = new_episodes(other, frame)
        kept = kept.assign(episode=source + ":" + kept["episode"].astype(str),
                           scene=kept["scene"].fillna("").astype(str))
        added = samples_for(kept, character, config.context_turns)
        run_logger("castbot.dialogues").info(
            "%s: %d training samples from %d new episodes; left out %d episodes this transcript holds (%s)", source,
            len(added), len({s["episode"] for s in added}), len(repeated), ", ".join(repeated) or "none")
        result["train"] += added
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
