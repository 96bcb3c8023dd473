"""The monitor: section of a profile, read by the monitor flow (flows/monitor.py), not by training."""

from pydantic import Field

from castbot.config.base import Strict


class MonitorConfig(Strict):
    """What the monitor flow (flows/monitor.py) checks in the chat log, and when it raises an event."""

    window_hours: float = Field(24.0, gt=0, le=24 * 90, description="Hours of the chat log each monitor run reads.")
    min_turns: int = Field(100, ge=2, le=100000, description="Fewest turns of the champion in the window for any "
                           "verdict; below: 'not enough data'. Measured (bench/monitor.py, Rick reference, 8 draws): "
                           "at 100 turns every draw of LOTR and Friends read as drift and none of held-out Rick; at "
                           "30, 5 of 8 Friends draws did.")
    min_clients: int = Field(3, ge=1, le=10000, description="Fewest distinct clients (API key names, or addresses "
                             "when the service runs open) whose turns the window must hold before a drift or degraded "
                             "verdict may raise an event; below: 'not enough clients'. Rates of cancelled streams and "
                             "of replies cut at max_new_tokens degrade only when at least this many clients cross "
                             "the limit, so one client cannot start a training run alone.")
    reference_size: int = Field(2000, ge=50, le=50000, description="Training contexts and character lines sampled "
                                "(seeded) into the reference stored with each registered version.")
    classifier_cap: int = Field(2000, ge=50, le=50000, description="Most user messages (a seeded sample) the "
                                "drift classifier sees; the vocabulary and length checks read all of them.")
    permutations: int = Field(10, ge=2, le=200, description="Label permutations whose AUCs give the drift "
                              "threshold (the noise of the classifier on this many turns).")
    permutation_quantile: float = Field(0.95, gt=0.5, lt=1, description="Quantile of the permuted AUCs used as "
                                        "the threshold: 0.95 = a 5% false alarm rate when nothing drifted.")
    min_drift_auc: float = Field(0.65, ge=0.5, le=1, description="Smallest ROC AUC that counts as drift whatever the "
                                 "permutations say: held-out episodes of the same show are told from the training "
                                 "ones a little (other guests, topics). Measured, Rick reference, 100 turns, 8 "
                                 "draws: held-out Rick 0.54-0.60, Friends 0.69-0.80, LOTR 0.82-0.88; Spanish 1.00.")
    max_oov_increase: float = Field(0.15, ge=0, le=1, description="Largest rise of the out-of-vocabulary word "
                                    "share over the reference's own (held-out episodes), before 'vocabulary: shifted'.")
    max_length_shift: float = Field(1.0, ge=0, le=100, description="Largest change of the mean message length, in "
                                    "standard deviations of the reference's lengths, before 'length: shifted'.")
    max_thumbs_down_rate: float = Field(0.3, ge=0, le=1, description="Largest share of rated turns rated -1.")
    min_ratings: int = Field(10, ge=1, description="Fewest rated turns before the thumbs-down rate is judged.")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="Largest share of turns that ended in an error.")
    max_cancelled_rate: float = Field(0.2, ge=0, le=1, description="Largest share of turns cancelled by the client.")
    max_latency_p95_s: float = Field(10.0, gt=0, description="Largest 95th percentile of the reply latency, seconds.")
    max_repeat3_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies repeating a word 3-gram.")
    max_empty_rate: float = Field(0.1, ge=0, le=1, description="Largest share of empty (no letter or digit) replies.")
    max_tokens_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies cut at max_new_tokens.")
    max_template_leak_rate: float = Field(0.05, ge=0, le=1, description="Largest share of replies holding template "
                                          "or role tokens.")
    min_likeness: float | None = Field(None, description="Least character likeness of the served replies (style "
                                       "classifier rebuilt from the reference; 0: like other speakers, 1: like the "
                                       "character). None: reported, not judged.")
    seed: int = Field(0, description="Seed of the samples and the permutations.")
