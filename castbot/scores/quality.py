"""Does the bot sound like its character? Model-free checks of generated replies and of evaluation losses.

Everything here is pure and fast (no model, no Prefect): a style classifier trained on the transcript (for a cast,
an attribution classifier telling its members apart, and its confusion matrix as a picture), degeneracy rates of a
set of replies, bootstrap intervals for perplexity, and a side-by-side table.
"""

import difflib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from castbot.common.text import markdown_cell
from castbot.model.bot import exp_mean

# Chat-template and role tokens a reply must never contain: ChatML (<|im_start|>, <|im_end|>), GPT-2's
# <|endoftext|> and any other <|...|> special token, Llama's <s> </s>, and a line that opens a role turn.
TEMPLATE_LEAK = re.compile(
    r"<\|[\w-]+\|>|</?s>|^[ \t]*(?:assistant|user|system)[ \t]*(?::|$)", re.IGNORECASE | re.MULTILINE
)
WORD = re.compile(r"[\w']+")
ECHO_RATIO = 0.8  # difflib ratio of the reply's and the user's word sequences at or above which a reply echoes


@dataclass
class CharacterClassifier:
    """A fitted style classifier: score(texts) is the probability that each text is the character's line."""

    character: str
    pipeline: Any  # sklearn Pipeline: tf-idf features -> logistic regression, refit on every given line
    heldout_accuracy: float  # on a seeded, stratified 20% of the given lines, before the refit
    heldout_balanced_accuracy: float  # mean of per-class recalls: 0.5 is chance whatever the class shares
    heldout_auc: float
    train_seconds: float

    def score(self, texts: list[str]) -> list[float]:
        """Probability in [0, 1] that each text is a line of the character rather than of anyone else."""
        if not texts:
            return []
        return self.pipeline.predict_proba(list(texts))[:, 1].tolist()


def character_features():
    """Word 1-2-gram + char_wb 2-5-gram tf-idf with sublinear tf: vocabulary and style tics (stutters, "*burp*")."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    return make_union(
        # token_pattern keeps one-letter words and apostrophes ("I", "don't"): stutters and contractions are style
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w[\w']*\b", dtype=np.float32),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, dtype=np.float32),
    )


def character_model(seed: int):
    """Class-balanced logistic regression: the character vs everyone else."""
    from sklearn.linear_model import LogisticRegression

    # C=1 (sklearn's default): C from 0.3 to 30 and char ranges 1-4 to 2-6 gave episode-held-out AUCs within
    # 0.005 of each other on both Rick and Morty transcripts. liblinear: same AUC as lbfgs, 2-4x faster here.
    return LogisticRegression(C=1.0, class_weight="balanced", solver="liblinear", random_state=seed)


def train_character_classifier(lines: list[tuple[str, str]], character: str, seed: int = 0) -> CharacterClassifier:
    """Fit character-vs-everyone-else on (speaker, text) pairs from training episodes; check it on 20% first."""
    import time

    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    texts = [text for _, text in lines]
    labels = np.array([speaker == character for speaker, _ in lines], dtype=int)
    positives = int(labels.sum())
    if positives < 5 or len(labels) - positives < 5:
        raise ValueError(f"need at least 5 lines of {character!r} and 5 of other speakers to train the style "
                         f"classifier; got {positives} and {len(labels) - positives}")
    started = time.perf_counter()
    # tf-idf is fitted once on every line (no labels, so the check stays fair; n-grams seen only in the held-out
    # lines get zero weight) and vectorising, the slow half, is not repeated for the refit
    features = character_features()
    matrix = features.fit_transform(texts)  # (lines, n-grams), sparse
    # random stratified split of lines: a sanity check of the fit, not the episode-level evaluation
    fit_rows, check_rows = train_test_split(np.arange(len(texts)), test_size=0.2, stratify=labels, random_state=seed)
    check = character_model(seed).fit(matrix[fit_rows], labels[fit_rows])
    probabilities = check.predict_proba(matrix[check_rows])[:, 1]
    predicted = probabilities >= 0.5
    pipeline = make_pipeline(features, character_model(seed).fit(matrix, labels))
    return CharacterClassifier(
        character, pipeline, heldout_accuracy=float(accuracy_score(labels[check_rows], predicted)),
        heldout_balanced_accuracy=float(balanced_accuracy_score(labels[check_rows], predicted)),
        heldout_auc=float(roc_auc_score(labels[check_rows], probabilities)),
        train_seconds=time.perf_counter() - started)


def likeness(classifier: CharacterClassifier, bot_replies: list[str], character_lines: list[str],
             other_lines: list[str]) -> dict:
    """Mean style score of the bot's replies, rescaled so other speakers' real lines are 0 and the character's 1.

    character_lines and other_lines are real lines from episodes the classifier did not see (the anchors).
    """
    if not bot_replies or not character_lines or not other_lines:
        raise ValueError("likeness needs at least one bot reply, one character line and one other speaker's line")
    raw = float(np.mean(classifier.score(bot_replies)))
    ref_character = float(np.mean(classifier.score(character_lines)))
    ref_other = float(np.mean(classifier.score(other_lines)))
    scale = ref_character - ref_other
    if scale <= 1e-6:  # the classifier does not rank the character's real lines above others': no scale to use
        raise ValueError(f"the style classifier does not separate {classifier.character!r}'s held-out lines "
                         f"(mean score {ref_character:.3f}) from other speakers' ({ref_other:.3f}); "
                         "train it on more lines or use more anchor lines")
    return {"likeness": (raw - ref_other) / scale, "likeness_raw": raw,
            "likeness_ref_character": ref_character, "likeness_ref_other": ref_other}


@dataclass
class CastClassifier:
    """A fitted attribution classifier: which cast member a line sounds like (N-way, chance 1/N)."""

    cast: list[str]
    pipeline: Any  # sklearn Pipeline: tf-idf features -> multinomial logistic regression, refit on every line
    heldout_accuracy: float  # on a seeded, stratified 20% of the given lines, before the refit
    heldout_balanced_accuracy: float  # mean of per-member recalls: 1/N is chance whatever the members' shares
    train_seconds: float

    def attribute(self, texts: list[str]) -> list[str]:
        """The cast member each text sounds most like."""
        return [str(name) for name in self.pipeline.predict(list(texts))] if texts else []


def train_cast_classifier(lines: list[tuple[str, str]], cast: list[str], seed: int = 0) -> CastClassifier:
    """Fit which-cast-member on the cast's (speaker, text) pairs from training episodes (other speakers' lines
    are left out); check it on a stratified 20% first."""
    import time
    from collections import Counter

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    lines = [(speaker, text) for speaker, text in lines if speaker in cast]
    counts = Counter(speaker for speaker, _ in lines)
    if thin := [f"{name} ({counts[name]})" for name in cast if counts[name] < 5]:
        raise ValueError(f"need at least 5 training lines of every cast member for the attribution classifier; "
                         f"got {', '.join(thin)}")
    started = time.perf_counter()
    texts, labels = [text for _, text in lines], np.array([speaker for speaker, _ in lines])
    features = character_features()
    matrix = features.fit_transform(texts)  # (lines, n-grams), sparse; unlabelled, so the check stays fair

    def model():  # class_weight balanced: a member with few lines is not out-voted by the lead
        return LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=seed)

    fit_rows, check_rows = train_test_split(np.arange(len(texts)), test_size=0.2, stratify=labels, random_state=seed)
    predicted = model().fit(matrix[fit_rows], labels[fit_rows]).predict(matrix[check_rows])
    pipeline = make_pipeline(features, model().fit(matrix, labels))
    return CastClassifier(list(cast), pipeline, float(accuracy_score(labels[check_rows], predicted)),
                          float(balanced_accuracy_score(labels[check_rows], predicted)), time.perf_counter() - started)


def attribution(asked: list[str], attributed: list[str], cast: list[str]) -> dict:
    """Share of replies attributed to the member they were asked of (all replies pooled), and chance, 1/N."""
    if not asked or len(asked) != len(attributed):
        raise ValueError(f"attribution needs one attributed member per reply; got {len(asked)} replies and "
                         f"{len(attributed)} attributions")
    return {"attribution": float(np.mean([a == b for a, b in zip(asked, attributed)])),
            "attribution_chance": 1 / len(cast)}


def confusion_matrix(asked: list[str], attributed: list[str], cast: list[str]) -> np.ndarray:
    """(members, members) counts: row = the member a reply was asked of, column = the member it sounds like."""
    index = {name: i for i, name in enumerate(cast)}
    matrix = np.zeros((len(cast), len(cast)), dtype=int)
    for a, b in zip(asked, attributed):
        matrix[index[a], index[b]] += 1
    return matrix


def confusion_figure(matrix: np.ndarray, cast: list[str], title: str):
    """The confusion matrix as a matplotlib Figure (no pyplot: no global state), each cell its count and row share."""
    from matplotlib.figure import Figure

    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # (members, members), rows sum to 1
    figure = Figure(figsize=(1.2 * len(cast) + 2.5, 1.0 * len(cast) + 2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(cast)), cast, rotation=30, ha="right")
    axes.set_yticks(range(len(cast)), cast)
    axes.set_xlabel("sounds like (attribution classifier)")
    axes.set_ylabel("asked to speak as")
    axes.set_title(title)
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, f"{count}\n{shares[row, column]:.0%}", ha="center", va="center",
                  color="white" if shares[row, column] > 0.6 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, label="share of the row's replies")
    return figure


def words(text: str) -> list[str]:
    """Lowercased word tokens (letters, digits, apostrophes); punctuation dropped."""
    return WORD.findall(text.lower())


def distinct2(texts: list[str]) -> float:
    """Distinct word bigrams / all word bigrams, pooled over texts (bigrams never cross texts); 0 when none."""
    bigrams = [pair for text in texts for pair in zip(words(text)[:-1], words(text)[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def size_matched_distinct2(real_lines: list[str], bigram_count: int) -> float:
    """Mean distinct-2 of consecutive chunks of real_lines holding about bigram_count bigrams each.

    Distinct-n falls as the text grows, so the replies are compared with real text of the same size.
    """
    chunks, chunk, size = [], [], 0
    for line in real_lines:
        chunk.append(line)
        size += max(len(words(line)) - 1, 0)
        if size >= max(bigram_count, 1):
            chunks.append(distinct2(chunk))
            chunk, size = [], 0
    if not chunks:  # the real lines hold fewer bigrams than the replies: use all of them
        chunks.append(distinct2(real_lines))
    return float(np.mean(chunks))


def is_echo(reply: str, last_user_turn: str) -> bool:
    """Whether the reply largely copies the user's last turn: difflib ratio of the word sequences >= 0.8."""
    reply_words, user_words = words(reply), words(last_user_turn)
    if not reply_words or not user_words:
        return False
    return difflib.SequenceMatcher(None, reply_words, user_words, autojunk=False).ratio() >= ECHO_RATIO


def has_repeat3(reply: str) -> bool:
    """Whether some word 3-gram occurs twice or more in the reply (a loop such as 'I am I am I am')."""
    tokens = words(reply)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(set(trigrams)) < len(trigrams)


def degeneracy(replies: list[str], last_user_turns: list[str], real_lines: list[str],
               hit_max_tokens: list[bool]) -> dict:
    """Shares of replies that loop, echo the user, are empty, ran out of tokens or leak template tokens.

    distinct2_ratio is distinct-2 of the replies over distinct-2 of the character's real lines (size-matched):
    about 1 = as varied as the character, well below 1 = the bot repeats itself across replies.
    """
    if not replies:
        raise ValueError("degeneracy needs at least one reply")
    if not len(replies) == len(last_user_turns) == len(hit_max_tokens):
        raise ValueError(f"replies ({len(replies)}), last_user_turns ({len(last_user_turns)}) and "
                         f"hit_max_tokens ({len(hit_max_tokens)}) must have one entry per reply")
    reply_bigrams = sum(max(len(words(reply)) - 1, 0) for reply in replies)
    real = size_matched_distinct2(real_lines, reply_bigrams)
    if real == 0:
        raise ValueError("real_lines hold no word bigrams: distinct2_ratio needs the character's real lines")
    return {
        "distinct2_ratio": distinct2(replies) / real,
        "repeat3_rate": float(np.mean([has_repeat3(r) for r in replies])),
        "echo_rate": float(np.mean([is_echo(r, u) for r, u in zip(replies, last_user_turns)])),
        "empty_rate": float(np.mean([not any(c.isalnum() for c in r) for r in replies])),
        "max_tokens_rate": float(np.mean([bool(hit) for hit in hit_max_tokens])),
        "template_leak_rate": float(np.mean([TEMPLATE_LEAK.search(r) is not None for r in replies])),
    }


def bootstrap_ratio(numerators: list[float], tokens: list[int], groups: list[str] | None, seed: int,
                    confidence: float, n_boot: int) -> tuple[float, float, float]:
    """sum(numerators) / sum(tokens) and its percentile bootstrap interval, resampling whole groups."""
    numerators, tokens = np.asarray(numerators, dtype=float), np.asarray(tokens, dtype=float)
    if numerators.size == 0 or numerators.shape != tokens.shape or (groups is not None and len(groups) != tokens.size):
        raise ValueError("losses, tokens and groups need one entry per sample, and at least one sample")
    if tokens.sum() <= 0 or (tokens < 0).any():
        raise ValueError("tokens must be non-negative counts of target tokens with a positive total")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError(f"confidence must lie in (0, 1) and n_boot be >= 1; got {confidence} and {n_boot}")
    # samples of one episode share context and style, so the episode (group) is the unit that is resampled
    _, group_index = np.unique(np.asarray(groups if groups is not None else np.arange(tokens.size), dtype=str),
                               return_inverse=True)
    group_num = np.bincount(group_index, weights=numerators)  # (groups,)
    group_tok = np.bincount(group_index, weights=tokens)
    picks = np.random.default_rng(seed).integers(0, group_num.size, size=(n_boot, group_num.size))
    with np.errstate(invalid="ignore", divide="ignore"):  # a replicate of only zero-token groups: nan, dropped
        replicates = group_num[picks].sum(axis=1) / group_tok[picks].sum(axis=1)  # (n_boot,)
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(replicates, [tail, 1 - tail])
    return float(numerators.sum() / tokens.sum()), float(low), float(high)


def perplexity_ci(losses: list[float], tokens: list[int], groups: list[str] | None, seed: int,
                  confidence: float = 0.95, n_boot: int = 1000) -> dict:
    """Perplexity exp(sum losses / sum tokens) with a bootstrap interval over groups (e.g. episodes).

    losses[i] is the summed token loss (nats) of sample i and tokens[i] its target-token count;
    groups=None resamples samples. The same seed gives the same interval.
    """
    mean, low, high = bootstrap_ratio(losses, tokens, groups, seed, confidence, n_boot)
    return {"perplexity": exp_mean(mean, 1), "low": exp_mean(low, 1), "high": exp_mean(high, 1)}


def paired_improvement(candidate_losses: list[float], champion_losses: list[float], tokens: list[int],
                       groups: list[str] | None, seed: int, confidence: float = 0.95, n_boot: int = 1000) -> dict:
    """Candidate minus champion mean loss per token (nats) on the same samples, with a paired bootstrap interval.

    Negative delta = the candidate is better; significant when the whole interval lies below 0.
    """
    if len(candidate_losses) != len(champion_losses):
        raise ValueError(f"candidate ({len(candidate_losses)}) and champion ({len(champion_losses)}) losses "
                         "must cover the same samples")
    # pairing: each replicate takes the same samples for both models, so sample difficulty cancels out
    differences = np.asarray(candidate_losses, dtype=float) - np.asarray(champion_losses, dtype=float)
    delta, low, high = bootstrap_ratio(differences.tolist(), tokens, groups, seed, confidence, n_boot)
    return {"delta": delta, "low": low, "high": high, "significant": bool(high < 0)}


def pooled_perplexity(losses: list[tuple[float, int]]) -> float:
    """exp(total loss / total target tokens) of (loss sum in nats, target tokens) pairs, as Bot.score returns them;
    a mean of per-sample or per-batch perplexities would weight short samples too much."""
    return exp_mean(sum(loss for loss, _ in losses), sum(n for _, n in losses))


def side_by_side_markdown(contexts: list[list[str]], replies: dict[str, list[str]], limit: int = 20) -> str:
    """A markdown table: the context's last turns, then one reply column per model (dict order).

    A model with fewer replies than contexts gets empty cells; an empty reply shows as _(empty)_.
    """
    names = list(replies)
    lines = ["| " + " | ".join(["context", *(markdown_cell(n, 40) for n in names)]) + " |",
             "|" + "---|" * (len(names) + 1)]
    for row, turns in enumerate(contexts[:limit]):
        cells = [markdown_cell(" / ".join(turns), 200, keep="end")]  # the last turns matter most
        for name in names:
            column = replies[name]
            if row >= len(column) or column[row] is None:
                cells.append("")
            else:
                cells.append(markdown_cell(column[row], 300) or "_(empty)_")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
