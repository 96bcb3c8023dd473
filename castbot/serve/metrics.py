"""The service's Prometheus metrics, declared once (BentoML serves them at /metrics beside its own).

Updated as turns finish, not read on scrape: BentoML's multiprocess metrics cannot read a gauge on scrape.
deployments/ (dashboards, alert rules) refer to these names.
"""

import prometheus_client

BATCH_SIZES = prometheus_client.Histogram(
    "castbot_generate_batch_size", "Prompts per model.generate() call, as the model actually ran them.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
GENERATED_TOKENS = prometheus_client.Counter(
    "castbot_generated_tokens", "Tokens generated, end-of-turn included; rate() gives generated tokens/s.")
FIRST_TOKEN = prometheus_client.Histogram(
    "castbot_time_to_first_token_seconds", "From a /chat/stream request to its first piece of reply.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
IN_FLIGHT = prometheus_client.Gauge("castbot_requests_in_flight", "Admitted API requests not yet answered.")
RUNNING_BATCH = prometheus_client.Gauge("castbot_running_batch_size",
                                        "Requests in the batch now decoding (adaptive engine: its generate() call).")
DECODING_STEPS = prometheus_client.Counter(
    "castbot_decoding_steps", "Continuous engine: decoding steps, each advancing every request in the batch by one "
    "token; rate(generated tokens) / rate(steps) is the mean running batch.")
CHATLOG_ERRORS = prometheus_client.Counter(
    "castbot_chatlog_errors", "Turns or ratings the conversation log failed to store (the reply still went out).")
CHATLOG_WRITE = prometheus_client.Histogram(
    "castbot_chatlog_write_seconds", "Time to commit one turn to the conversation log, before the reply completes.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


def batch_started(size: int) -> None:
    """The adaptive engine's hook, per static batch it runs."""
    BATCH_SIZES.observe(size)
    RUNNING_BATCH.set(size)


class EngineMetrics:
    """Per finished turn: its tokens and time to first piece, and the engine's running batch and decoding steps."""

    def __init__(self, engine):
        self.engine, self.steps_counted = engine, 0

    def turn_finished(self, new_tokens: int, first_piece_s: float | None) -> None:
        GENERATED_TOKENS.inc(new_tokens)
        if first_piece_s is not None:
            FIRST_TOKEN.observe(first_piece_s)
        RUNNING_BATCH.set(self.engine.running())
        steps = self.engine.steps()
        DECODING_STEPS.inc(steps - self.steps_counted)
        self.steps_counted = steps
