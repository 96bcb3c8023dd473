"""Fine-tuning: grouped batches, checkpoints a rerun can trust, LoRA merged into a plain model, config bounds."""

import logging
import shutil

import pytest

from castbot.config.profile import ConfigError, load_profile
from tasks.train.batches import LengthBucketSampler
from tasks.train.checkpoints import CHECKPOINTS, checkpoint_problem, latest_checkpoint
from tasks.train.finetune import train_model
from tests.conftest import tiny_config


@pytest.fixture
def tiny_data(tiny_show):
    """Config, base model folder and tokenised splits of the tiny show."""
    from flows.train import training_texts
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript
    from tasks.data.tokenize import tokenize_dialogues
    from tasks.train.base_model import prepare_base_model

    config = tiny_config(tiny_show, **{"training.early_stopping_patience": 0})
    splits = build_dialogues.fn(load_transcript.fn(config.data), config.character, config.dialogue, 42)
    base = prepare_base_model.fn(config.base_model, training_texts(splits["train"]), config.offline_model, 42)
    return config, base, tokenize_dialogues.fn(splits, base, config.dialogue)


def scored_perplexity(folder: str, dataset) -> float:
    """Perplexity of a model folder on tokenised rows, scored as evaluate_model scores (Bot.score)."""
    from castbot.model.bot import Bot, load_tokenizer, load_weights
    from castbot.model.dialogue import DialogueFormat
    from castbot.scores.quality import pooled_perplexity

    bot = Bot(load_tokenizer(folder), load_weights(folder), DialogueFormat())
    return pooled_perplexity(bot.score(dataset.to_list()))


def padding(lengths, batches):
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / processed


@pytest.mark.unit
def test_length_buckets_cut_padding_below_5_percent_and_cover_every_sample_once():
    import random

    rng = random.Random(0)
    lengths = [min(128, int(rng.lognormvariate(3.5, 0.6))) + 2 for _ in range(1605)]  # dialogue-like spread
    sampler = LengthBucketSampler(lengths, batch_size=16, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    naive = list(range(len(lengths)))
    rng.shuffle(naive)
    assert padding(lengths, batches) <= 0.05 < padding(lengths, [naive[i:i + 16] for i in range(0, 1605, 16)])
    assert list(sampler) == order, "the same epoch must give the same order (resume skips trained batches)"
    sampler.set_epoch(1)
    assert list(sampler) != order


@pytest.mark.flow
def test_a_corrupt_or_partial_checkpoint_is_skipped_with_a_warning_and_training_resumes(tiny_data, tmp_path, caplog):
    config, base, datasets = tiny_data
    first = train_model(base, datasets, config.training, str(tmp_path))
    assert first["train_global_step"] == 12 and first["train_resumed_from_step"] == 0
    checkpoints = tmp_path / CHECKPOINTS
    assert checkpoint_problem(checkpoints / "checkpoint-12") is None
    weights = checkpoints / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    partial = checkpoints / "checkpoint-18"
    shutil.copytree(checkpoints / "checkpoint-6", partial)
    (partial / "trainer_state.json").unlink()  # killed before the Trainer wrote its state

    assert checkpoint_problem(checkpoints / "checkpoint-12") == "model.safetensors is truncated"
    with caplog.at_level(logging.WARNING, logger="castbot.finetune"):
        assert latest_checkpoint(checkpoints) == str(checkpoints / "checkpoint-6")
    warnings = caplog.text
    assert "checkpoint-18: no trainer_state.json" in warnings
    assert "checkpoint-12: model.safetensors is truncated" in warnings
    assert len(list(checkpoints.glob("skipped-checkpoint-*"))) == 2 and not partial.exists()

    resumed = train_model(base, datasets, config.training, str(tmp_path))
    assert resumed["train_resumed_from_step"] == 6 and resumed["train_global_step"] == 12
    assert resumed["train_tokens"] < first["train_tokens"], "the resumed run trains only the steps after 6"


@pytest.mark.flow
def test_lora_saves_small_adapters_that_load_merged_into_their_base(tiny_data, tmp_path):
    """A LoRA run stores adapters and the base's name (a nightly candidate costs little); loading merges them."""
    import torch
    from transformers import AutoModelForCausalLM

    from castbot.model.dialogue import DialogueFormat
    from castbot.model.folder import ModelCard, load_weights, read_card
    from tasks.release.bento import save_servable

    config, base, datasets = tiny_data
    training = config.training.model_copy(update={"method": "lora", "max_steps": 6, "learning_rate": 0.05})
    card = ModelCard(format=DialogueFormat(), max_length=128, base_model=base)
    result = train_model(base, datasets, training, str(tmp_path), card=card)
    folder = tmp_path / "model"
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    before = AutoModelForCausalLM.from_pretrained(base)
    base_bytes = sum(p.numel() * p.element_size() for p in before.parameters())
    assert (folder / "adapter_model.safetensors").stat().st_size < 0.5 * base_bytes
    after = load_weights(result["model_path"])
    assert type(after).__name__ == "GPT2LMHeadModel"
    assert result["train_trainable_params"] < 0.5 * sum(p.numel() for p in before.parameters())
    block_before, block_after = before.transformer.h[0], after.transformer.h[0]
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # peft's all-linear default
        assert not torch.equal(block_before.get_submodule(name).weight, block_after.get_submodule(name).weight), name
    assert torch.equal(before.transformer.wte.weight, after.transformer.wte.weight), "LoRA leaves embeddings alone"
    assert read_card(folder) == card
    save_servable(folder, tmp_path / "servable")  # the Bento's copy: merged once, its card names no base
    assert read_card(tmp_path / "servable") == card.model_copy(update={"base_model": None})
    served = load_weights(str(tmp_path / "servable"))
    assert torch.equal(served.transformer.h[0].attn.c_attn.weight, after.transformer.h[0].attn.c_attn.weight)


@pytest.mark.flow
def test_bf16_training_learns_and_reports_its_precision(tiny_data, tmp_path):
    """bf16 autocast really trains: validation perplexity falls from the base model's."""
    config, base, datasets = tiny_data
    training = config.training.model_copy(update={"precision": "bf16", "max_steps": 12, "learning_rate": 0.01})
    result = train_model(base, datasets, training, str(tmp_path))
    assert result["precision"] == "bf16" and result["train_precision_bf16"] == 1.0
    assert 0 <= result["train_padding_fraction"] < 1 and result["train_tokens_per_s"] > 0
    before = scored_perplexity(base, datasets["validation"])
    after = scored_perplexity(result["model_path"], datasets["validation"])
    assert after < 0.8 * before, (before, after)


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    ({"training.method": "lora", "training.lora.r": 0}, "training.lora.r"),
    ({"training.lora.dropout": 0.9}, "training.lora.dropout"),
    ({"training.eval_steps": 4, "training.save_steps": 6},
     "save_steps (6) must be a multiple of training.eval_steps (4)"),
    ({"training.early_stopping_patience": -1}, "training.early_stopping_patience"),
])
def test_bad_training_settings_are_refused_naming_the_key(tmp_path, overrides, message):
    import yaml

    raw = tiny_config(tmp_path / "x.csv").model_dump(mode="json")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile(profile)


@pytest.mark.unit
def test_fp16_on_a_cpu_is_refused_and_auto_picks_a_supported_precision():
    import torch

    from castbot.model.folder import pick_precision

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16")
    assert pick_precision("auto") in ("fp32", "bf16")
    assert pick_precision("bf16") == "bf16"


@pytest.mark.flow
def test_sample_replies_are_reproducible_text_for_every_fixed_prompt(tiny_data, tmp_path):
    from castbot.model.bot import Bot
    from tasks.evaluate.replies import PROMPTS, replies_to_prompts, samples_markdown

    config, base, datasets = tiny_data
    model_path = train_model(base, datasets, config.training.model_copy(update={"max_steps": 6}),
                             str(tmp_path))["model_path"]
    bot = Bot.load(model_path)
    replies = replies_to_prompts(bot)
    assert len(replies) == len(PROMPTS) and all(isinstance(r, str) for r in replies)
    assert any(replies), "a trained model says something"
    assert replies_to_prompts(bot) == replies == replies_to_prompts(Bot.load(model_path))  # seeded, not stateful
    table = samples_markdown("Ada", PROMPTS, replies)
    assert table.count("\n| ") == len(PROMPTS) + 1 and "top_p=0.7" in table and PROMPTS[0] in table


@pytest.mark.flow
def test_two_processes_train_through_accelerate_launch_with_the_same_code(tiny_data, tmp_path):
    """DDP on CPU (gloo) stands in for a GPU node: the task launches `accelerate launch` with the shipped config."""
    from mlflow import MlflowClient

    from tasks.train.finetune import fine_tune

    config, base, datasets = tiny_data
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("ddp-test")).info.run_id
    training = config.training.model_copy(update={"processes": 2,
                                                  "accelerate_config": "configs/accelerate/multi-gpu.yaml"})
    model_path = fine_tune.fn(base, datasets, training, str(tmp_path), run_id)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["train_processes"] == 2 and metrics["train_global_step"] == 12
    assert (tmp_path / "model" / "model.safetensors").is_file() and model_path == str(tmp_path / "model")
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(run_id)}
