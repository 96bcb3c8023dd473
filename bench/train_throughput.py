"""Training throughput: real tokens/s and padding for fp32 vs bf16, grouped vs naive batches, flow vs bare loop.

    python -m bench.train_throughput                       # Rick and Morty, offline model and a 4x one
    python -m bench.train_throughput --steps 40 --repeats 3 --profile configs/rick-and-morty.yaml
    python -m bench.train_throughput --models 4x --steps 6 --repeats 2 --no-quality --threads 1
    python -m bench.train_throughput --models smollm2 --methods full,lora --steps 6 --repeats 1 --no-quality

"flow" is tasks.train.finetune.train_model, the body of the fine-tune task (Trainer, callbacks, checkpoint at the
end); its tokens/s excludes evaluation and checkpoint time. "bare" is a plain torch loop over the same
batches with the same optimiser, schedule, clipping and autocast. tokens/s counts real tokens only
(padding excluded); padding = padded positions / all positions in the training batches. Each figure is the
median over --repeats runs (this machine is shared and noisy). The quality check trains the profile's own
schedule in fp32 and in bf16 and compares test perplexity (fp32 evaluation, exp(sum loss / target tokens)).
"""

import argparse
import statistics
import tempfile
import time

from castbot.config.profile import load_profile
from castbot.config.training import OfflineModelConfig, TrainingConfig

SHAPES = {
    "offline": None,  # offline-tiny in the profile's offline_model shape
    "4x": {"n_embd": 256, "n_layer": 5, "n_head": 8},  # ~4x the parameters of the default offline shape
    "smollm2": "smollm2-135m",  # the pretrained base (134.5M parameters), in its chat format
}


def prepare(profile: str, shape_name: str):
    """Splits, base model folder and tokenised datasets for the profile with the named model shape."""
    from flows.train import training_data, training_texts
    from tasks.data.lineage import report_dir
    from tasks.data.tokenize import choose_format, tokenize_dialogues
    from tasks.train.base_model import OFFLINE, prepare_base_model

    config = load_profile(profile)
    named = isinstance(SHAPES[shape_name], str)
    shape = config.offline_model if named or SHAPES[shape_name] is None else OfflineModelConfig(
        **{**config.offline_model.model_dump(), **SHAPES[shape_name]})
    splits = training_data(config, report_dir()).splits
    base = prepare_base_model.fn(SHAPES[shape_name] if named else OFFLINE, training_texts(splits["train"]), shape,
                                 config.training.seed)
    fmt = choose_format(base, config.dialogue, config.character, config.show)
    return config, splits, base, tokenize_dialogues.fn(splits, base, config.dialogue, fmt)


def bench_config(config: TrainingConfig, steps: int, precision: str, batching: str,
                 method: str = "full") -> TrainingConfig:
    """The profile's training settings for a fixed number of steps; one evaluation and save at the end."""
    return config.model_copy(update={"max_steps": steps, "eval_steps": steps, "save_steps": steps, "method": method,
                                     "precision": precision, "batching": batching, "early_stopping_patience": 0})


def flow_step(base: str, datasets, config: TrainingConfig) -> dict:
    """The fine-tune task's code path (tasks.train.finetune.train_model) in a fresh folder."""
    from tasks.train.finetune import train_model

    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(base, datasets, config, tmp)
    return {"tokens_per_s": result["train_tokens_per_s"], "padding": result["train_padding_fraction"]}


def bare_loop(base: str, datasets, config: TrainingConfig) -> dict:
    """The same training with nothing but torch: sampler, collator, AdamW, schedule, clipping, autocast."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import DataCollatorForSeq2Seq, get_scheduler

    from castbot.model.dialogue import IGNORE_INDEX
    from castbot.model.folder import load_tokenizer
    from tasks.train.batches import LengthBucketSampler
    from tasks.train.finetune import load_model

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    model = load_model(base, config, tokenizer.pad_token_id).train()  # LoRA-wrapped when config.method is lora
    train = datasets["train"]
    generator = torch.Generator().manual_seed(config.seed)
    sampler = (LengthBucketSampler([len(x) for x in train["input_ids"]], config.batch_size, config.seed)
               if config.batching == "group_by_length" else RandomSampler(train, generator=generator))
    loader = DataLoader(train, batch_size=config.batch_size, sampler=sampler, drop_last=False,
                        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=True)
    schedule = get_scheduler(config.lr_scheduler, optimizer, int(config.warmup_ratio * config.max_steps),
                             config.max_steps)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    real = total = step = 0
    start = time.perf_counter()
    while step < config.max_steps:
        for batch in loader:
            mask = batch["attention_mask"]  # (batch, seq)
            real, total = real + int(mask.sum()), total + mask.numel()
            with autocast:
                loss = model(**batch).loss  # mean over target tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == config.max_steps:
                break
    seconds = time.perf_counter() - start
    return {"tokens_per_s": real / seconds, "padding": 1 - real / total}


def quality(base: str, datasets, config: TrainingConfig) -> dict:
    """Test perplexity after the profile's full schedule in fp32 and in bf16 (evaluated in fp32)."""
    from castbot.model.bot import Bot
    from castbot.model.dialogue import DialogueFormat
    from castbot.scores.quality import pooled_perplexity
    from tasks.train.finetune import train_model

    scores = {}
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            result = train_model(base, datasets, config.model_copy(update={"precision": precision}), tmp)
            bot = Bot.load(result["model_path"], fmt=DialogueFormat(), dtype="float32")  # evaluated in fp32
            scores[precision] = {"perplexity": pooled_perplexity(bot.score(datasets["test"].to_list())),
                                 "tokens_per_s": result["train_tokens_per_s"], "steps": result["train_global_step"]}
    return scores


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="configs/rick-and-morty.yaml")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    parser.add_argument("--models", default="offline,4x", help="offline, 4x, smollm2 (comma-separated)")
    parser.add_argument("--methods", default="full", help="full, lora (comma-separated)")
    parser.add_argument("--no-quality", action="store_true", help="skip the fp32-vs-bf16 perplexity check")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); on a CPU shared with other jobs 1 thread avoids "
                             "OpenMP spin-waiting and measured 4-8x faster than 2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"avx512_bf16={torch.cpu._is_avx512_bf16_supported()} amx={torch.cpu._is_amx_tile_supported()}")

    rows = {}
    for shape in args.models.split(","):
        profile, _, base, datasets = prepare(args.profile, shape)
        model = __import__("transformers").AutoModelForCausalLM.from_pretrained(base)
        params = sum(p.numel() for p in model.parameters())
        print(f"\n{shape}: {params / 1e6:.2f}M parameters, {len(datasets['train'])} training samples, "
              f"batch {profile.training.batch_size}, {args.steps} steps x {args.repeats} repeats")
        warm = bench_config(profile.training, 2, "bf16", "group_by_length")
        flow_step(base, datasets, warm), bare_loop(base, datasets, warm)  # untimed: first-call costs (oneDNN kernels)
        for repeat in range(args.repeats):
            for method in args.methods.split(","):
                for precision in ("fp32", "bf16"):
                    for batching in ("group_by_length", "random"):
                        config = bench_config(profile.training, args.steps, precision, batching, method)
                        for path, run in (("flow", flow_step), ("bare", bare_loop)):
                            figures = run(base, datasets, config)
                            rows.setdefault((f"{shape}/{method}", precision, batching, path), []).append(figures)
                            print(f"  run {repeat + 1}: {method} {precision} {batching:15s} {path}: "
                                  f"{figures['tokens_per_s']:8.0f} tokens/s, padding {figures['padding']:.1%}",
                                  flush=True)
        if not args.no_quality and shape == "offline":
            scores = quality(base, datasets, profile.training)
            ratio = scores["bf16"]["perplexity"] / scores["fp32"]["perplexity"]
            print(f"  quality ({scores['fp32']['steps']:.0f} steps): test perplexity fp32 "
                  f"{scores['fp32']['perplexity']:.2f}, bf16 {scores['bf16']['perplexity']:.2f} "
                  f"(bf16/fp32 = {ratio:.3f}; goal within 2%)")

    median = {key: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for key, runs in rows.items()}
    print("\nmedian real tokens/s (padding excluded) and padding share of processed positions")
    print(f"{'model':14s} {'precision':9s} {'batching':15s} {'flow tok/s':>10s} {'bare tok/s':>10s} "
          f"{'flow/bare':>9s} {'padding':>8s} {'bf16/fp32':>9s} {'grouped/naive':>13s}")
    for (shape, precision, batching, path), figures in median.items():
        if path != "flow":
            continue
        bare = median[(shape, precision, batching, "bare")]
        vs_fp32 = figures["tokens_per_s"] / median[(shape, "fp32", batching, "flow")]["tokens_per_s"]
        vs_naive = figures["tokens_per_s"] / median[(shape, precision, "random", "flow")]["tokens_per_s"]
        print(f"{shape:14s} {precision:9s} {batching:15s} {figures['tokens_per_s']:10.0f} {bare['tokens_per_s']:10.0f} "
              f"{figures['tokens_per_s'] / bare['tokens_per_s']:9.2f} {figures['padding']:8.1%} "
              f"{vs_fp32:9.2f} {vs_naive:13.2f}")
    print("goals: flow/bare >= 0.95; bf16/fp32 >= 2 with perplexity within 2%; padding <= 5% (grouped)")


if __name__ == "__main__":
    main()
