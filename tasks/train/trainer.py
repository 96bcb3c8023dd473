"""The Trainer that fine-tuning runs, its callbacks, and its arguments from the config.

Imports transformers at module level (to subclass Trainer): import it inside the function that trains.
"""

import time
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

from castbot.compat.transformers_fixes import TrainerHooks
from castbot.config.training import TrainingConfig
from tasks.train.batches import LengthBucketSampler


class CountingTrainer(TrainerHooks, Trainer):
    """Counts real and padded training tokens; times evaluation and checkpointing apart from training;
    batches by length with LengthBucketSampler under train_sampling_strategy="group_by_length"."""

    def __init__(self, *args, **kwargs):
        self.tokens_real = self.tokens_total = 0
        self.seconds_aside = 0.0  # s spent evaluating, saving and reloading checkpoints
        super().__init__(*args, **kwargs)

    def train_sampler(self, dataset):
        if self.args.train_sampling_strategy != "group_by_length":
            return None
        return LengthBucketSampler([len(ids) for ids in dataset["input_ids"]],
                                   self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                   self.args.data_seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs["attention_mask"]  # (batch, seq): 1 for a real token, 0 for padding
        self.tokens_real += int(mask.sum())
        self.tokens_total += mask.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def time_aside(self, method, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self.seconds_aside += time.perf_counter() - start

    def evaluate(self, *args, **kwargs):
        return self.time_aside(super().evaluate, *args, **kwargs)


class LoopTimer(TrainerCallback):
    """`started`: perf_counter at on_train_begin, after optimizer/dataloader setup, before step 1."""

    started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()


class LossToMlflow(TrainerCallback):
    """Send logged loss / eval_loss to the MLflow run (when run_id is given) and to logger (rank 0 only)."""

    def __init__(self, run_id: str | None, logger):
        self.run_id, self.logger, self.client = run_id, logger, None
        if run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if self.client:
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, value, step=state.global_step)
        self.logger.info("step %d/%d %s", state.global_step, state.max_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


class ReportToTrial(TrainerCallback):
    """Report each validation loss to the Optuna trial; when the pruner says so, stop training at once
    (raises optuna.TrialPruned out of trainer.train(), before that step's checkpoint)."""

    def __init__(self, trial):
        self.trial, self.last_step = trial, 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        if not state.is_world_process_zero or "eval_loss" not in (metrics or {}):
            return
        self.last_step = state.global_step
        self.trial.report(float(metrics["eval_loss"]), step=state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step}: validation loss "
                                     f"{metrics['eval_loss']:.4f} is worse than the median of earlier trials")


def training_arguments(config: TrainingConfig, checkpoints: Path, precision: str):
    """TrainingArguments from the config: the one place the Trainer's behaviour is set."""
    import torch

    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a share of all steps
        weight_decay=config.weight_decay,
        bf16=precision == "bf16",  # autocast; weights and optimizer state stay fp32
        fp16=precision == "fp16",  # autocast + dynamic loss scaler
        use_cpu=not torch.cuda.is_available(),
        torch_compile=config.compile,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,  # the newest and the best
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        logging_steps=max(1, config.eval_steps // 5),
        train_sampling_strategy=config.batching,  # group_by_length: LengthBucketSampler (training), grouped eval
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        # on a GPU, collate in worker processes so the GPU does not wait on Python padding; on CPU they
        # would take the cores the model needs
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
