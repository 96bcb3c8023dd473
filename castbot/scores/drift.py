"""Has what users say moved away from what the bot was trained on, and are its replies still healthy?

Pure functions over lists and a pandas frame of logged turns (castbot/chatlog/store.py's `turns()`), no Prefect, no
MLflow: the monitor flow wires them. Each check returns a Check whose line states the verdict and its figures.
"""

import random
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from castbot.config.monitor import MonitorConfig
from castbot.scores.quality import degeneracy, likeness, train_character_classifier, words
from tasks.release.trained_on import oov_rate

DEGENERACY_CAP = 5000  # replies checked for loops and echoes (difflib per reply): a seeded sample beyond this
CV_FOLDS = 3
# out-of-fold AUC averaged over this many fold assignments: with ~100 production texts one assignment alone moved
# the AUC of the same held-out Rick lines between 0.47 and 0.67 (bench/monitor.py)
CV_REPEATS = 3


@dataclass
class Check:
    """One verdict of the monitor: name, 'yes' / 'no' / 'ok' / 'shifted' / 'degraded' / 'not enough data' /
    'not enough clients: N of M' ..."""

    name: str
    verdict: str
    detail: str  # the figures behind the verdict, as printed
    figures: dict[str, float] = field(default_factory=dict)  # logged as MLflow metrics, sent in the event payload
    alarm: bool = False  # crosses a threshold: counts towards the drifted / degraded event
    character: str = ""  # the cast member whose turns were judged; "" for a one-character model

    def line(self) -> str:
        who = f"{self.character}: " if self.character else ""
        return f"{who}{self.name}: {self.verdict} ({self.detail})"


def domain_features():
    """Word 1-2-gram + char_wb 2-4-gram tf-idf: what users talk about and how they write it."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    return make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w[\w']*\b", dtype=np.float32),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, dtype=np.float32),
    )


def cross_validated_auc(matrix, labels: np.ndarray, seed: int) -> float:
    """ROC AUC of out-of-fold probabilities of a class-balanced logistic regression (stratified folds), the mean
    over CV_REPEATS fold assignments."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    aucs = []
    for repeat in range(CV_REPEATS):
        model = LogisticRegression(C=1.0, class_weight="balanced", solver="liblinear", random_state=seed)
        folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed + repeat)
        scores = cross_val_predict(model, matrix, labels, cv=folds, method="predict_proba")[:, 1]
        aucs.append(roc_auc_score(labels, scores))
    return float(np.mean(aucs))


def domain_classifier_drift(reference: list[str], production: list[str], cap: int, permutations: int,
                            quantile: float, min_auc: float, seed: int) -> dict:
    """Can a classifier tell production messages from reference contexts? Cross-validated ROC AUC (0.5: no),
    against a threshold: the `quantile` of the AUCs with shuffled labels (what this many texts give by chance),
    and at least min_auc. Each side is a seeded sample of at most `cap` distinct texts: a message sent many times
    ("hi") would otherwise land in every fold and be learnt by heart, and repeats alone would read as drift."""
    rng = random.Random(seed)
    distinct_ref, distinct_prod = sorted(set(reference)), sorted(set(production))
    ref = rng.sample(distinct_ref, min(cap, len(distinct_ref)))
    prod = rng.sample(distinct_prod, min(cap, len(distinct_prod)))
    labels = np.array([0] * len(ref) + [1] * len(prod))
    started = time.perf_counter()
    matrix = domain_features().fit_transform(ref + prod)  # (texts, n-grams), sparse; no labels used
    auc = cross_validated_auc(matrix, labels, seed)
    shuffled = np.random.default_rng(seed)
    null = [cross_validated_auc(matrix, shuffled.permutation(labels), seed) for _ in range(permutations)]
    threshold = max(float(np.quantile(null, quantile)), min_auc)
    return {"auc": auc, "threshold": threshold, "permutation_threshold": float(np.quantile(null, quantile)),
            "reference_texts": len(ref), "production_texts": len(prod), "sampled": len(distinct_prod) > cap,
            "seconds": time.perf_counter() - started, "drift": auc > threshold}


def drift_checks(reference: dict, messages: list[str], monitor: MonitorConfig) -> list[Check]:
    """Drift of users' messages vs the reference: domain classifier, out-of-vocabulary share, message length."""
    result = domain_classifier_drift(reference["contexts"], messages, monitor.classifier_cap, monitor.permutations,
                                     monitor.permutation_quantile, monitor.min_drift_auc, monitor.seed)
    sampled = f", classifier on a sample of {result['production_texts']}" if result["sampled"] else ""
    drift = Check("drift", "yes" if result["drift"] else "no",
                  f"AUC {result['auc']:.2f} {'>' if result['drift'] else '<='} threshold {result['threshold']:.2f} "
                  f"[permutation {monitor.permutation_quantile:.0%} {result['permutation_threshold']:.2f}, "
                  f"floor {monitor.min_drift_auc:.2f}], {len(messages)} turns, {len(set(messages))} distinct"
                  f"{sampled}",
                  {"drift_auc": result["auc"], "drift_threshold": result["threshold"],
                   "drift_permutation_threshold": result["permutation_threshold"]}, result["drift"])
    oov = oov_rate(messages, set(reference["vocabulary"]))
    rise = oov - reference["oov_baseline"]
    vocabulary = Check("vocabulary", "shifted" if rise > monitor.max_oov_increase else "ok",
                       f"out-of-vocabulary {oov:.2f} vs reference {reference['oov_baseline']:.2f}, "
                       f"limit +{monitor.max_oov_increase:.2f}",
                       {"oov_rate": oov, "oov_baseline": reference["oov_baseline"]}, rise > monitor.max_oov_increase)
    mean = float(np.mean([len(words(m)) for m in messages]))
    shift = abs(mean - reference["length_mean"]) / max(reference["length_std"], 1e-9)
    length = Check("length", "shifted" if shift > monitor.max_length_shift else "ok",
                   f"mean {mean:.1f} words vs reference {reference['length_mean']:.1f}, {shift:.2f} sd, "
                   f"limit {monitor.max_length_shift:.2f}", {"message_words_mean": mean, "length_shift_sd": shift},
                   shift > monitor.max_length_shift)
    return [drift, vocabulary, length]


def client_of(turns: pd.DataFrame) -> pd.Series:
    """Who sent each turn (the API key's name, or the address of an open service); turns logged before clients
    were recorded ("") count as one client."""
    return turns["client"].fillna("").astype(str)


def clients_over(hits: pd.Series, clients: pd.Series, limit: float) -> int:
    """How many clients' own share of hits (one bool per turn, same index as clients) exceeds limit."""
    return int((hits.astype(float).groupby(clients.loc[hits.index]).mean() > limit).sum())


def judge(over_limit: bool, over: int, min_clients: int) -> tuple[str, bool]:
    """Verdict and alarm of a figure past its limit: degraded only when at least monitor.min_clients clients are
    past it on their own turns too; one client that cancels its streams, asks for one token or rates every reply
    down makes 'not enough clients: N of M' (N clients past the limit, M needed), not an event."""
    if not over_limit:
        return "ok", False
    if over >= min_clients:
        return "degraded", True
    return f"not enough clients: {over} of {min_clients}", False


def rate_check(name: str, hits: pd.Series, limit: float, what: str, clients: pd.Series, min_clients: int) -> Check:
    """A share of turns against its largest allowed value, in the window and per client."""
    rate = float(hits.mean()) if len(hits) else 0.0
    over = clients_over(hits, clients, limit)
    verdict, alarm = judge(rate > limit, over, min_clients)
    return Check(name, verdict, f"{rate:.3f} of {len(hits)} {what}, limit {limit:.3f}, {over} clients past it",
                 {f"{name}_rate": rate, f"{name}_clients_over": float(over)}, alarm)


def health_checks(turns: pd.DataFrame, monitor: MonitorConfig) -> list[Check]:
    """Errors, cancelled streams, latency percentiles and thumbs-down share of the logged turns."""
    clients, least = client_of(turns), monitor.min_clients
    latency = turns["latency_s"].astype(float)
    p50, p95 = (float(latency.quantile(q)) for q in (0.5, 0.95))
    slow = int((latency.groupby(clients).quantile(0.95) > monitor.max_latency_p95_s).sum())  # clients' own p95
    verdict, alarm = judge(p95 > monitor.max_latency_p95_s, slow, least)
    ratings = turns["rating"].dropna()
    if len(ratings) >= monitor.min_ratings:
        thumbs = rate_check("thumbs_down", ratings < 0, monitor.max_thumbs_down_rate, "rated turns", clients, least)
    else:
        thumbs = Check("thumbs_down", "not enough data", f"{len(ratings)} rated turns < monitor.min_ratings="
                       f"{monitor.min_ratings}", {"rated_turns": float(len(ratings))})
    return [
        rate_check("errors", turns["finish_reason"] == "error", monitor.max_error_rate, "turns", clients, least),
        rate_check("cancelled", turns["finish_reason"] == "cancelled", monitor.max_cancelled_rate, "turns", clients,
                   least),
        Check("latency", verdict, f"p50 {p50:.2f} s, p95 {p95:.2f} s, limit p95 {monitor.max_latency_p95_s:.2f} s, "
              f"{slow} clients past it", {"latency_p50_s": p50, "latency_p95_s": p95}, alarm),
        thumbs,
    ]


def degeneracy_of(answered: pd.DataFrame, reference: dict) -> dict:
    """castbot.scores.quality.degeneracy of the answered turns' replies."""
    return degeneracy(answered["reply"].astype(str).tolist(), answered["message"].astype(str).tolist(),
                      reference["character_lines"], (answered["finish_reason"] == "length").tolist())


def reply_checks(reference: dict, turns: pd.DataFrame, monitor: MonitorConfig) -> list[Check]:
    """Degeneracy of the answered replies (the gate's checks) and, when the reference allows, their likeness. A
    rate past its limit counts only when monitor.min_clients clients' own replies are past it too."""
    answered = turns[turns["finish_reason"].isin(["stop", "length"])]
    if answered.empty:
        return [Check("replies", "not enough data", "no answered turns")]
    if len(answered) > DEGENERACY_CAP:
        answered = answered.sample(DEGENERACY_CAP, random_state=monitor.seed)
    figures = degeneracy_of(answered, reference)
    limits = {"repeat3_rate": monitor.max_repeat3_rate, "empty_rate": monitor.max_empty_rate,
              "max_tokens_rate": monitor.max_tokens_rate, "template_leak_rate": monitor.max_template_leak_rate}
    past = [key for key, limit in limits.items() if figures[key] > limit]
    over = dict.fromkeys(past, 0)  # clients past each crossed limit on their own replies
    for _, own in (answered.groupby(client_of(answered)) if past else []):
        mine = degeneracy_of(own, reference)
        for key in past:
            over[key] += mine[key] > limits[key]
    # degraded when some crossed limit is crossed by enough clients on their own replies
    verdict, alarm = judge(bool(past), max(over.values(), default=0), monitor.min_clients)
    detail = ("; ".join(f"{key} {figures[key]:.3f} > {limits[key]:.3f} ({over[key]} clients)" for key in past)
              if past else ", ".join(f"{key} {figures[key]:.3f}" for key in limits))
    checks = [Check("degeneracy", verdict, f"{detail}, {len(answered)} replies", figures, alarm)]
    checks.append(likeness_check(reference, answered["reply"].astype(str).tolist(), monitor))
    return checks


def likeness_check(reference: dict, replies: list[str], monitor: MonitorConfig) -> Check:
    """Character likeness of replies under a style classifier rebuilt from the reference (80% fit, 20% anchors)."""
    character, others = reference["character_lines"], reference["other_lines"]
    cut_c, cut_o = int(len(character) * 0.8), int(len(others) * 0.8)
    lines = [(reference["character"], t) for t in character[:cut_c]] + [("", t) for t in others[:cut_o]]
    try:
        classifier = train_character_classifier(lines, reference["character"], monitor.seed)
        score = likeness(classifier, replies, character[cut_c:], others[cut_o:])["likeness"]
    except ValueError as exc:  # too few reference lines to tell the character apart
        return Check("likeness", "not judged", str(exc))
    low = monitor.min_likeness is not None and score < monitor.min_likeness
    limit = f"limit {monitor.min_likeness:.2f}" if monitor.min_likeness is not None else "not judged"
    return Check("likeness", "degraded" if low else "ok" if monitor.min_likeness is not None else "reported",
                 f"{score:.2f} (0: other speakers, 1: {reference['character']}), {limit}", {"likeness": score}, low)


def window_checks(reference: dict, turns: pd.DataFrame, monitor: MonitorConfig) -> list[Check]:
    """Every check on a window of the champion's turns, or one 'not enough data' below monitor.min_turns. With
    turns from fewer distinct clients than monitor.min_clients, no check raises an event: one that would reads
    'not enough clients: N of M' (N clients in the window, M needed), its figures kept."""
    if len(turns) < monitor.min_turns:
        return [Check("window", "not enough data", f"{len(turns)} turns < monitor.min_turns={monitor.min_turns}",
                      {"turns": float(len(turns))})]
    messages = turns["message"].astype(str).tolist()
    checks = [*drift_checks(reference, messages, monitor), *reply_checks(reference, turns, monitor),
              *health_checks(turns, monitor)]
    clients = client_of(turns).nunique()
    short = f"not enough clients: {clients} of {monitor.min_clients}"
    if clients < monitor.min_clients:
        checks = [Check(c.name, short, f"would read {c.verdict}: {c.detail}", c.figures) if c.alarm else c
                  for c in checks]
    return [*checks, Check("clients", short if clients < monitor.min_clients else "ok",
                           f"{clients} distinct clients in the window, monitor.min_clients={monitor.min_clients}",
                           {"clients": float(clients)})]


def cast_window_checks(reference: dict, turns: pd.DataFrame, monitor: MonitorConfig) -> list[Check]:
    """A cast model's window: each member's turns (the log's `character`) through window_checks against that
    member's own reference (reference["cast"]), every check naming its member. A member below monitor.min_turns
    reads 'window: not enough data' alone; turns as someone the reference does not hold read 'reference: not
    judged'. Neither raises an event. A reference stored before members had their own: the whole window against
    it, as for one character, under a 'cast: not judged per member' that says to retrain."""
    if "cast" not in reference:
        return [Check("cast", "not judged per member", f"the champion's reference holds one character's, "
                      f"{reference['character']}: every turn judged against it; retrain to judge each member"),
                *window_checks(reference, turns, monitor)]
    spoken = turns["character"].fillna("").astype(str)
    checks = []
    for name, own in reference["cast"].items():
        mine = turns[spoken == name].reset_index(drop=True)
        checks += [replace(check, character=name) for check in window_checks(own, mine, monitor)]
    for name, count in spoken[~spoken.isin(list(reference["cast"]))].value_counts().sort_index().items():
        checks.append(Check("reference", "not judged", f"{count} turns as {name}, who is not in the champion's "
                            f"cast ({', '.join(reference['cast'])})", {"turns": float(count)}, character=name))
    return checks
