"""What OpenVINO's export does to a champion's quality: test perplexity of the torch model (fp32) and of its int8
and fp32 exports on the profile's test split, and greedy replies side by side.

    python -m bench.openvino_quality configs/lotr.yaml          # the profile's champion (models:/NAME@champion)

The servable folder is the champion's, merged as the Bento build merges it (tasks/release/bento.py: save_servable); the
exports are the ones castbot's OpenVINO engine serves, cached per content in the state folder. The Bento build
makes the same measurement (registry.openvino: auto) against the candidate's own figure.
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPLIES = 5


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openvino_quality", description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="The profile whose champion and test split to measure, e.g. configs/lotr.yaml.")
    args = parser.parse_args(argv)

    from castbot.common.settings import use_project_state

    use_project_state()
    from castbot.config.profile import load_profile
    from castbot.model.bot import Bot
    from castbot.model.dialogue import sample_turns
    from castbot.scores.quality import pooled_perplexity
    from castbot.serve.engines.openvino import OpenVINOEngine
    from flows.train import training_data
    from tasks.data.lineage import report_dir
    from tasks.evaluate.perplexity import EvalSet, measure_perplexity
    from tasks.release.bento import save_servable
    from tasks.release.openvino_export import export_openvino, exported_losses
    from tasks.release.registry import download_champion

    config = load_profile(args.profile)
    samples = training_data(config, report_dir()).splits["test"]
    with tempfile.TemporaryDirectory() as tmp:
        champion = download_champion(config.model_name, str(Path(tmp) / "champion"))
        if champion is None:
            print(f"no champion of {config.model_name}: run python -m flows.train {args.profile} first",
                  file=sys.stderr)
            return 1
        folder = Path(tmp) / "servable"
        save_servable(Path(champion["path"]), folder)
        bot = Bot.load(str(folder), dtype="float32")
        test = EvalSet.encode(samples, bot, config.dialogue.max_length)
        encoded = list(test.rows)
        torch_figures = measure_perplexity(bot, test)
        rows = [("torch fp32", torch_figures.perplexity, torch_figures.word_perplexity)]
        words = sum(len(s["response"].split()) for s in samples)
        chats = [sample_turns(s) for s in samples[:REPLIES]]
        replies = {"torch fp32": [r.reply for r in bot.generate(chats, temperature=0, max_new_tokens=32)]}
        for weights in ("int8", "fp32"):
            export = export_openvino(folder, weights)
            losses = exported_losses(export, encoded)
            total = sum(loss for loss, _ in losses)
            rows.append((f"OpenVINO {weights}", pooled_perplexity(losses), pooled_perplexity([(total, words)])))
            engine = OpenVINOEngine(bot, export, max_batch_size=REPLIES)
            try:
                replies[f"OpenVINO {weights}"] = [r.reply for r in engine.replies(chats, temperature=0,
                                                                                 max_new_tokens=32)]
            finally:
                engine.close()
    reference = rows[0][1]
    print(f"\n{config.model_name} v{champion['version']}, {len(samples)} test samples, {torch_figures.tokens} "
          "target tokens")
    print(f"{'':16}{'per token':>10}{'per word':>10}{'vs torch':>10}")
    for name, per_token, per_word in rows:
        print(f"{name:16}{per_token:>10.3f}{per_word:>10.1f}{per_token / reference - 1:>+10.2%}")
    for i, sample in enumerate(samples[:REPLIES]):
        print(f"\n{sample['speakers'][-1]}: {sample['context'][-1]}")
        for name, texts in replies.items():
            print(f"  {name:14} {texts[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
