"""Which dialogue format fits a base model: test perplexity and replies of the untuned base in each format,
beside any trained models (each in the format recorded in its castbot.json).

    python -m bench.dialogue_formats configs/rick-and-morty.yaml
    python -m bench.dialogue_formats configs/rick-and-morty.yaml --model .castbot/runs/<key>/model

Perplexity is exp(total response-token loss / count) over the profile's test split, per token and per word;
replies answer the first --replies test contexts with the service's decoding defaults (seeded).
"""

import argparse

from castbot.config.profile import load_profile
from castbot.model.dialogue import DialogueFormat


def test_split(profile: str):
    """The profile's config, base model folder and test samples, built as the flow builds them."""
    from flows.train import training_data
    from tasks.data.lineage import report_dir
    from tasks.train.base_model import prepare_base_model

    config = load_profile(profile)
    splits = training_data(config, report_dir()).splits
    base = prepare_base_model.fn(config.base_model, [], config.offline_model, config.training.seed)
    return config, base, splits["test"]


def measure(bot, samples: list[dict], max_length: int, replies: int) -> dict:
    """Per-token and per-word test perplexity, and seeded replies to the first contexts."""
    from castbot.model.dialogue import sample_turns
    from tasks.evaluate.judge import generate_replies
    from tasks.evaluate.perplexity import EvalSet, measure_perplexity

    figures = measure_perplexity(bot, EvalSet.encode(samples, bot, max_length))
    said = [r.reply for r in generate_replies(bot, [sample_turns(s) for s in samples[:replies]], seed=0)]
    return {"token": figures.perplexity, "word": figures.word_perplexity, "replies": said}


def main() -> None:
    from castbot.model.bot import Bot

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--model", action="append", default=[], help="a trained model folder (repeatable)")
    parser.add_argument("--replies", type=int, default=5)
    args = parser.parse_args()
    config, base, samples = test_split(args.profile)
    max_length = config.dialogue.max_length
    print(f"{args.profile}: {len(samples)} test samples, "
          f"{sum(len(s['response'].split()) for s in samples)} words in the responses")
    rows = {}
    for style in ("eos", "chat"):
        fmt = DialogueFormat(style, config.character, config.show or "")
        rows[f"base, {style} format"] = measure(Bot.load(base, fmt=fmt, max_length=max_length), samples, max_length,
                                                args.replies)
    for path in args.model:
        bot = Bot.load(path, max_length=max_length)
        rows[f"{path} ({bot.format.style})"] = measure(bot, samples, max_length, args.replies)
    print(f"\n{'model':60s} {'per token':>10s} {'per word':>10s}")
    for name, row in rows.items():
        print(f"{name:60s} {row['token']:10.1f} {row['word']:10.1f}")
    for name, row in rows.items():
        print(f"\n{name}:")
        for sample, reply in zip(samples, row["replies"]):
            print(f"  [{sample['context'][-1][:60] if sample['context'] else ''}] -> {reply}")


if __name__ == "__main__":
    main()
