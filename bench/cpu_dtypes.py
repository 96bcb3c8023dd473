"""fp32 against bf16 on this CPU: matmul speed at SmolLM2's shapes, and a served model's test perplexity in each.

    python -m bench.cpu_dtypes                      # matmuls only
    python -m bench.cpu_dtypes --model demo-bot     # and the champion's held-out perplexity in both dtypes

Why: the service loads weights in bf16 where oneDNN multiplies bf16 natively (castbot.model.folder.native_cpu_bf16);
this shows what that buys and what it costs.
"""

import argparse
import sys
import tempfile
import time

SHAPES = [(1, 576, 1536), (32, 576, 1536), (256, 576, 1536)]  # rows x SmolLM2's hidden x its MLP width


def matmul_gflops(rows: int, inner: int, cols: int, dtype, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    for _ in range(5):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * rows * inner * cols * count / (time.perf_counter() - start) / 1e9


def held_out_perplexity(model_name: str) -> dict[str, float]:
    """The champion's test perplexity (per token) on its profile's test split, in fp32 and in bf16."""
    import torch
    from mlflow import MlflowClient

    from bench.serve_throughput import DEMO_PROFILE, held_out_samples
    from castbot.config.profile import load_profile
    from castbot.model.bot import Bot
    from tasks.evaluate.perplexity import EvalSet, measure_perplexity
    from tasks.release.registry import download_champion

    config = load_profile(str(DEMO_PROFILE))
    test = held_out_samples(DEMO_PROFILE)
    MlflowClient().get_model_version_by_alias(model_name, "champion")  # a clear error when there is none
    folder = download_champion.fn(model_name, tempfile.mkdtemp(prefix="castbot-dtypes-"))["path"]
    bot = Bot.load(folder, max_length=config.dialogue.max_length)
    encoded = EvalSet.encode(test, bot, config.dialogue.max_length)
    figures = {"float32": measure_perplexity(bot, encoded).perplexity}
    bot.model.to(torch.bfloat16)
    figures["bfloat16"] = measure_perplexity(bot, encoded).perplexity
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_dtypes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Registered model whose champion to score in both dtypes, e.g. demo-bot "
                        "(trained on configs/demo.yaml).")
    args = parser.parse_args(argv)
    import torch

    from castbot.common.settings import use_project_state
    from castbot.model.folder import native_cpu_bf16

    use_project_state()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_cpu_bf16()}")
    print(f"{'matmul':>18}{'fp32 GFLOP/s':>14}{'bf16 GFLOP/s':>14}{'bf16/fp32':>11}")
    for shape in SHAPES:
        fp32, bf16 = (matmul_gflops(*shape, dtype) for dtype in (torch.float32, torch.bfloat16))
        print(f"{'x'.join(map(str, shape)):>18}{fp32:>14.0f}{bf16:>14.0f}{bf16 / fp32:>10.2f}x")
    if args.model:
        figures = held_out_perplexity(args.model)
        change = figures["bfloat16"] / figures["float32"] - 1
        print(f"\n{args.model} champion, test perplexity per token: fp32 {figures['float32']:.3f}, "
              f"bf16 {figures['bfloat16']:.3f} ({change:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
