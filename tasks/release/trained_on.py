"""What a registered model version was trained on, stored with it for the monitor: a seeded sample of the users'
side (the last context line of each training sample), the character's lines, vocabulary and length figures.

The monitor (flows/monitor.py) needs only the chat log and this artifact of the version's MLflow run.
"""

import json
import random
from collections import Counter

import numpy as np
from prefect import task

from castbot.scores.quality import words

REFERENCE_ARTIFACT = "monitoring/reference.json"
REFERENCE_TAG = "castbot.reference"  # on the model version: the run artifact path of the reference
VOCABULARY_LIMIT = 50000  # most frequent context words kept; Friends' 67k lines hold ~15k distinct words


class MonitorError(RuntimeError):
    """The monitor cannot run: no champion, no reference, no chat log. The message says what to do."""


def oov_rate(texts: list[str], vocabulary: set[str]) -> float:
    """Share of word tokens of texts that are not in vocabulary; nan when the texts hold no words."""
    tokens = [word for text in texts for word in words(text)]
    return float(np.mean([word not in vocabulary for word in tokens])) if tokens else float("nan")


def user_side(samples: list[dict], character: str) -> list[tuple[str, bool]]:
    """(last context line, spoken by someone else) per sample with a context: what a user would have said."""
    return [(s["context"][-1], s["speakers"][-1] != character) for s in samples if s["context"]]


def build_reference(splits: dict[str, list[dict]], character: str, size: int, seed: int,
                    cast: list[str] | None = None) -> dict:
    """The reference of a training run (see member_reference); a cast model's (its samples each naming their
    `character`) adds "cast": each member's own reference from its samples alone, in the cast's order, which the
    monitor judges that member's logged turns against."""
    reference = member_reference(splits, character, size, seed)
    if cast:
        reference["cast"] = {name: member_reference({split: [s for s in samples if s.get("character") == name]
                                                     for split, samples in splits.items()}, name, size, seed)
                             for name in cast}
    return reference


def member_reference(splits: dict[str, list[dict]], character: str, size: int, seed: int) -> dict:
    """Up to `size` seeded training contexts and character lines, the context vocabulary, word-length figures, and
    the out-of-vocabulary share of the held-out contexts (the baseline of the monitor's vocabulary check: new
    episodes bring new names even when nothing drifted)."""
    rng = random.Random(seed)
    contexts = user_side(splits["train"], character)
    held_out = [text for name in ("validation", "test") for text, _ in user_side(splits[name], character)]
    lengths = np.array([len(words(text)) for text, _ in contexts] or [0])  # words per context line
    counts = Counter(word for text, _ in contexts for word in words(text))
    vocabulary = [word for word, _ in counts.most_common(VOCABULARY_LIMIT)]
    picked = rng.sample(contexts, min(size, len(contexts)))
    responses = [s["response"] for s in splits["train"]]
    return {
        "character": character,
        "contexts": [text for text, _ in picked],
        # lines of other speakers: the style classifier's negatives when the monitor judges likeness
        "other_lines": [text for text, other in picked if other],
        "character_lines": rng.sample(responses, min(size, len(responses))),
        "vocabulary": vocabulary,
        "length_mean": float(lengths.mean()), "length_std": float(lengths.std()),
        "oov_baseline": oov_rate(held_out, set(vocabulary)) if held_out else 0.0,
        "train_contexts": len(contexts), "seed": seed,
    }


@task(name="store_reference", retries=2, retry_delay_seconds=2)
def store_reference(run_id: str, model_name: str, version: str, reference: dict, tags: dict[str, str]) -> None:
    """Log the reference as an artifact of the version's run and tag the version with its path (and `tags`)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_text(run_id, json.dumps(reference), REFERENCE_ARTIFACT)
    for key, value in {REFERENCE_TAG: REFERENCE_ARTIFACT, **tags}.items():
        client.set_model_version_tag(model_name, version, key, value)


def load_reference(model_name: str, alias: str = "champion") -> tuple[str, dict]:
    """(version, reference) of the version the alias points at; MonitorError naming the fix when missing."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException as exc:
        raise MonitorError(f"{model_name} has no {alias} version in the registry at {mlflow.get_tracking_uri()} "
                           f"({exc.error_code}): train and promote one first (python -m flows.train PROFILE.yaml)") \
            from None
    path = version.tags.get(REFERENCE_TAG)
    if not path:
        raise MonitorError(f"{model_name} version {version.version} has no monitoring reference (tag "
                           f"{REFERENCE_TAG}): it was registered before references existed; retrain with "
                           "python -m flows.train PROFILE.yaml")
    text = mlflow.artifacts.load_text(f"runs:/{version.run_id}/{path}")
    return str(version.version), json.loads(text)
