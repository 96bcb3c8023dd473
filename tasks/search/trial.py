"""One trial of a study: its MLflow run, nested under the study's, and its fine-tune, pruned on its validation
losses (tasks/search/study.py opens the study and publishes it). A cast's trial is judged on every member:
member_objective."""

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.common.logs import run_logger
from castbot.config.profile import PipelineConfig

PRUNED, COMPLETE = "PRUNED", "COMPLETE"


@dataclass
class TrialOutcome:
    state: str  # COMPLETE or PRUNED
    value: float | None  # the objective: best validation loss (a cast: member_objective), nats per target token
    step: int  # last optimiser step trained
    run_id: str
    message: str = ""
    members: dict[str, dict] = field(default_factory=dict)  # a cast: member -> member_validation's figures


def member_objective(members: dict[str, dict]) -> float:
    """A cast trial's objective: the mean over members of each member's validation loss (nats per target token,
    pooled over that member's samples), i.e. the log of the geometric mean of their validation perplexities.

    Every member counts alike: the pooled validation loss weights members by their tokens, so the one with most
    lines would choose the settings alone. A mean of losses, not of perplexities: a 10 % lower perplexity counts
    the same for any member, where a mean of perplexities is decided by the member whose lines are hardest to
    predict. Not the worst member's: that is whoever is hardest to predict, not whoever the settings serve worst,
    and the others would not count at all (the gate already refuses a candidate that makes any member worse than
    the base model or the champion beyond the noise). The unit is a one-character study's: nats per token."""
    if not members:
        raise ValueError("no cast member has validation samples: the trial cannot be judged")
    return sum(m["loss"] for m in members.values()) / len(members)


def member_validation(model_path: str, validation, samples: list[dict], cast: list[str]) -> dict[str, dict]:
    """Each cast member's validation loss (nats per target token), perplexity, samples and tokens for the trained
    model (the checkpoint with the best pooled validation loss, which the Trainer keeps), on the rows training was
    validated on, in cast order; a member with no validation tokens is left out (and named in the log)."""
    from castbot.model.bot import Bot
    from tasks.evaluate.perplexity import character_scores
    from tasks.evaluate.scores import Sample

    if len(validation) != len(samples):
        raise ValueError(f"{len(validation)} tokenised validation rows for {len(samples)} samples")
    losses = Bot.load(model_path).score([dict(row) for row in validation])  # (nats, target tokens) per sample
    figures = {m.character: m for m in character_scores(tuple(Sample.of(s) for s in samples), losses) if m.tokens}
    unjudged = [name for name in cast if name not in figures]
    if unjudged:
        run_logger("castbot.tune").warning("no validation samples of %s: the trial is judged on the other members",
                                           ", ".join(unjudged))
    return {name: {"loss": math.log(m.perplexity), "perplexity": m.perplexity, "samples": m.samples,
                   "tokens": m.tokens} for name in cast if (m := figures.get(name))}


def cast_tag(config: PipelineConfig) -> dict[str, str]:
    """A cast study run's castbot.cast tag: its members, or 'top N' (resolved against the transcript); {} for one
    character."""
    if config.cast is None:
        return {}
    return {"castbot.cast": ",".join(config.cast) if isinstance(config.cast, list) else f"top {config.cast.top}"}


@task(name="start_study_run", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def start_study_run(config: PipelineConfig, study) -> str:
    """The study's MLflow run (reopened when the study resumes); trial runs a killed process left RUNNING are
    closed as KILLED."""
    from mlflow import MlflowClient

    from tasks.release.registry import experiment_artifacts, git_commit

    client = MlflowClient()
    name = config.tune.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(name, artifact_location=experiment_artifacts(name)))
    found = client.search_runs([experiment_id], filter_string=f"tags.`castbot.study` = '{study.study_name}' "
                                                              "and tags.`castbot.role` = 'study'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=f"{study.study_name}-study", tags={
            "castbot.study": study.study_name, "castbot.role": "study", "castbot.character": config.character or "",
            "castbot.base_model": config.base_model, "castbot.git_commit": git_commit(),
            **cast_tag(config)}).info.run_id
        for key, spec in config.search_space().items():
            client.log_param(run_id, f"space.{key}", json.dumps(spec.model_dump(exclude_none=True)))
        client.log_text(run_id, json.dumps(config.model_dump(mode="json"), indent=1), "profile.json")
    stale = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' "
                                                              "and attributes.status = 'RUNNING'")
    for run in stale:
        client.set_tag(run.info.run_id, "castbot.trial_state", "FAIL")
        client.set_terminated(run.info.run_id, "KILLED")
    return run_id


def retry_of(trial) -> int | None:
    """The number of the killed trial this one retries (RetryHeartbeatStaleTrialCallback's system attribute)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs.get("failed_trial")


def start_trial_run(study_run_id: str, trial, settings: dict) -> str:
    """A trial's MLflow run, nested under the study run, with its settings as params."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(study_run_id)
    original = retry_of(trial)
    tags = {"mlflow.parentRunId": study_run_id, "castbot.study": parent.data.tags["castbot.study"],
            "castbot.role": "trial", "castbot.trial": str(trial.number), "castbot.trial_state": "RUNNING",
            "castbot.trial_origin": str(trial.user_attrs.get("origin", "sampler"))}
    if original is not None:
        tags["castbot.retry_of"] = str(original)
    run = client.create_run(parent.info.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
    for key, value in settings.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


@task(name="run_trial", task_run_name="trial-{trial.number}", cache_policy=NO_CACHE)
def run_trial(trial, trial_config: PipelineConfig, settings: dict, base_model: str, datasets, card,
              study_run_id: str, folder: str, validation: list[dict] | None = None, cast: list[str] | None = None):
    """Fine-tune with one trial's settings, pruned on its (pooled) validation losses; the Prefect state says Pruned.
    validation and cast: a cast's validation samples (the rows of datasets["validation"]) and members: the trial is
    then judged by member_objective, its members' figures kept as the trial's user attribute "members" and its run's
    metrics (validation_perplexity_<member>, validation_loss_<member>, members_eval_loss)."""
    import optuna
    from mlflow import MlflowClient
    from prefect.states import Completed

    from castbot.config.profile import slug
    from tasks.train.finetune import plot_loss_curve, train_model
    from tasks.train.trainer import ReportToTrial

    client = MlflowClient()
    run_id = start_trial_run(study_run_id, trial, settings)
    # a retried trial trains in its original's folder, so it resumes from the killed trial's last checkpoint
    output = Path(folder) / f"trial-{retry_of(trial) or trial.number}"
    reporter = ReportToTrial(trial)
    try:
        result = train_model(base_model, datasets, trial_config.training, str(output), run_id, card,
                             callbacks=[reporter])
        losses = [h["eval_loss"] for h in result["log_history"] if "eval_loss" in h]
        if not losses:
            raise ValueError(f"trial {trial.number} reached no validation: training.eval_steps "
                             f"({trial_config.training.eval_steps}) is beyond its last step")
        outcome = TrialOutcome(COMPLETE, min(losses), int(result["train_global_step"]), run_id)
        if validation is not None:
            outcome.members = member_validation(result["model_path"], datasets["validation"], validation, cast)
            outcome.value = member_objective(outcome.members)
            trial.set_user_attr("members", outcome.members)
            trial.set_user_attr("pooled_eval_loss", min(losses))  # all members' samples together
        client.log_artifact(run_id, str(plot_loss_curve(result["log_history"], output / "loss_curve.png")))
    except optuna.TrialPruned as pruned:
        outcome = TrialOutcome(PRUNED, None, reporter.last_step, run_id, str(pruned))
    except BaseException:
        client.set_tag(run_id, "castbot.trial_state", "FAIL")
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(output, ignore_errors=True)  # the study keeps figures, not weights: the winner is retrained
    client.set_tag(run_id, "castbot.trial_state", outcome.state)
    if outcome.value is not None:
        client.log_metric(run_id, "best_eval_loss", min(losses))  # the Trainer's, all members pooled
    if outcome.members:
        client.log_metric(run_id, "members_eval_loss", outcome.value)
        for member, figures in outcome.members.items():
            for key in ("loss", "perplexity"):
                if math.isfinite(figures[key]):
                    client.log_metric(run_id, f"validation_{key}_{slug(member)}", figures[key])
    client.set_terminated(run_id, "FINISHED" if outcome.state == COMPLETE else "KILLED")
    return Completed(name="Pruned" if outcome.state == PRUNED else "Completed", data=outcome,
                     message=outcome.message or f"{'mean member' if outcome.members else 'best'} validation loss "
                                                f"{outcome.value:.4f}")
