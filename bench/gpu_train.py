"""Fine-tuning on a GPU: tokens/s and model FLOPs utilisation (MFU) of a DialoGPT-small-sized model.

    python -m bench.gpu_train --steps 60 --batch-size 32 --seq-len 256 --precisions auto,fp16,fp32

Runs the fine-tune step's own code (tasks.train.finetune.train_model) on a GPT-2 of DialoGPT-small's shape
(12 layers, 768 wide, 50,257-token vocabulary, ~124M parameters), randomly initialised so that no hub
access is needed, on random token sequences of one length (no padding). MFU = achieved model FLOP/s
/ --peak-tflops, with 6·N FLOPs per token for the weights plus 12·layers·width·seq_len for attention
(the PaLM appendix B count). The default peak, 989 TFLOP/s, is an H100 SXM's dense bf16/fp16 rate.
"""

import argparse
import tempfile
from pathlib import Path

DIALOGPT_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


def build_model(folder: Path) -> int:
    """A tokenizer (offline builder) plus a DialoGPT-small-shaped GPT-2 in folder; returns the parameter count."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from castbot.config.training import OfflineModelConfig
    from tasks.train.base_model import build_offline_model

    texts = [f"line {i} of a made-up dialogue about rockets and numbers" for i in range(200)]
    build_offline_model(texts, OfflineModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2), 0, folder)
    config = GPT2Config(**DIALOGPT_SMALL, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def random_dataset(rows: int, seq_len: int, seed: int):
    """Fixed-length random token rows; the loss is taken on every token."""
    import torch
    from datasets import Dataset

    ids = torch.randint(2, DIALOGPT_SMALL["vocab_size"], (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * rows, "labels": ids})


def main() -> None:
    from castbot.config.training import TrainingConfig
    from tasks.train.finetune import train_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precisions", default="auto,fp16,fp32")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true", help="training.compile: torch.compile the model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        n_params = build_model(base)
        flops_per_token = 6 * n_params + 12 * DIALOGPT_SMALL["n_layer"] * DIALOGPT_SMALL["n_embd"] * args.seq_len
        data = {"train": random_dataset(args.steps * args.batch_size, args.seq_len, 0),
                "validation": random_dataset(args.batch_size, args.seq_len, 1)}
        print(f"model: {n_params / 1e6:.1f}M parameters, {flops_per_token / 1e9:.2f} GFLOP per token (fwd+bwd)")
        print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, compile={args.compile}")
        print(f"{'precision':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'final loss':>10}")
        for precision in args.precisions.split(","):
            config = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, eval_steps=args.steps,
                                    save_steps=args.steps, precision=precision, learning_rate=1e-4,
                                    early_stopping_patience=0, compile=args.compile)
            result = train_model(str(base), data, config, str(Path(tmp) / precision))
            tflops = result["train_tokens_per_s"] * flops_per_token / 1e12
            loss = [h["loss"] for h in result["log_history"] if "loss" in h][-1]
            print(f"{result['precision']:>10} {result['train_tokens_per_s']:>10.0f} {tflops:>8.1f} "
                  f"{tflops / args.peak_tflops:>6.1%} {loss:>10.3f}")


if __name__ == "__main__":
    main()
