"""Sample replies to fixed prompts after training, so a person can judge the character's style."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.common.text import markdown_cell
from castbot.model.dialogue import DECODING_DEFAULTS

# The same prompts for every run and profile, so runs compare side by side.
PROMPTS = (
    "Hello, how are you today?",
    "Where are we going?",
    "What do you think about science?",
    "I need your help with something.",
    "Why did you do that?",
)


def replies_to_prompts(bot, prompts: tuple[str, ...] = PROMPTS, seed: int = 0) -> list[str]:
    """One sampled reply of a loaded Bot per prompt (an unnamed user's one-line chat) with the shared decoding
    defaults, batched; seeded, so a rerun gives the same text."""
    from tasks.evaluate.judge import generate_replies

    return [r.reply for r in generate_replies(bot, [[("", p)] for p in prompts], seed)]


def samples_markdown(character: str, prompts: tuple[str, ...], replies: list[str]) -> str:
    """A two-column table: prompt, reply."""
    decoding = ", ".join(f"{k}={v}" for k, v in DECODING_DEFAULTS.items())
    rows = "\n".join(f"| {markdown_cell(p) or '*(empty)*'} | {markdown_cell(r) or '*(empty)*'} |"
                     for p, r in zip(prompts, replies))
    return f"### Sample replies from {character}\n\nDecoding: {decoding}\n\n| prompt | reply |\n|---|---|\n{rows}\n"


@task(name="sample_replies", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def sample_replies(bot, run_id: str, character: str) -> list[str]:
    """A loaded Bot's replies to PROMPTS, logged as MLflow text (samples.md) and a Prefect markdown artifact."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    replies = replies_to_prompts(bot)
    markdown = samples_markdown(character, PROMPTS, replies)
    MlflowClient().log_text(run_id, markdown, "samples.md")
    create_markdown_artifact(markdown, key="sample-replies", description=f"{character}: replies to fixed prompts")
    return replies
