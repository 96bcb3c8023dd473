"""Fine-tune a causal LM on tokenised dialogues with transformers' Trainer."""

import logging
from pathlib import Path

from prefect import get_run_logger, task

from castbot.config import TrainingConfig
from castbot.dialogue import DECODING_DEFAULTS


def pick_precision(requested: str) -> str:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint that saved completely (trainer state and weights present), else None."""
    log = logging.getLogger("castbot.finetune")
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in checkpoints:
        complete = (checkpoint / "trainer_state.json").is_file() and any(checkpoint.glob("model*.safetensors"))
        if complete:
            return str(checkpoint)
        log.warning("skipping incomplete checkpoint %s", checkpoint)
    return None


class MlflowLossCallback:
    """Send the Trainer's logged loss / eval_loss to an MLflow run and to the Prefect log."""

    def __init__(self, run_id: str, logger):
        from mlflow import MlflowClient

        self.client, self.run_id, self.logger = MlflowClient(), run_id, logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value, step=state.global_step)
        self.logger.info("step %d/%d %s", state.global_step, state.max_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


@task(name="fine-tune")
def fine_tune(base_model: str, datasets, config: TrainingConfig, output_dir: str, run_id: str) -> str:
    """Train from base_model (resuming from output_dir's last checkpoint); returns the saved model folder."""
    import torch
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, EarlyStoppingCallback,
                              PrinterCallback,
                              Trainer, TrainerCallback, TrainingArguments)

    from tasks.tokenize import load_tokenizer

    logger = get_run_logger()
    output = Path(output_dir)
    precision = pick_precision(config.precision)
    tokenizer = load_tokenizer(base_model)
    tokenizer.padding_side = "right"  # training pads on the right; the saved tokenizer pads left for generation
    model = AutoModelForCausalLM.from_pretrained(base_model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a share of all steps
        weight_decay=config.weight_decay,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        logging_steps=max(1, config.eval_steps // 5),
        train_sampling_strategy="group_by_length",  # little padding per batch
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = type("LossToMlflow", (MlflowLossCallback, TrainerCallback), {})(run_id, logger)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=[callback, EarlyStoppingCallback(early_stopping_patience=3)],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the Prefect logger instead
    resume = latest_checkpoint(output / "checkpoints")
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    final = output / "model"
    tokenizer.padding_side = "left"
    trainer.model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer.model.generation_config.max_new_tokens = DECODING_DEFAULTS["max_new_tokens"]
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    return str(final)
