"""A hyper-parameter study: Optuna trials that fine-tune with the profile's settings varied, each an MLflow run.

The study lives in SQLite under the state folder (tune/optuna.db): a rerun of the same profile and search space
continues it. A trial writes a heartbeat; a trial whose process was killed is marked FAIL when the study runs
again and retried once with its settings (RetryHeartbeatStaleTrialCallback), resuming from its checkpoints.
The objective is the best validation loss (nats per target token) a trial reached; a cast's, the mean over its
members of each member's validation loss (tasks/search/trial.py: member_objective, which says why), each member's
figures kept on the trial. The test split is never read. One trial's MLflow run and training: tasks/search/trial.py.
"""

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.common.logs import run_logger
from castbot.common.settings import STATE_DIR
from castbot.config.profile import PipelineConfig, slug
from castbot.config.search import SearchRange

OBJECTIVE = "best validation loss, nats per target token on the validation split"
CAST_OBJECTIVE = ("mean over the cast members of each member's validation loss, every member counting alike, nats "
                  "per target token on the validation split")


def objective_text(config: PipelineConfig) -> str:
    """What a study of this profile minimises, in words."""
    return CAST_OBJECTIVE if config.cast is not None else OBJECTIVE


class StudyBusy(RuntimeError):
    """Another process is running this study (one of its trials keeps writing heartbeats)."""


def study_folder(name: str) -> Path:
    """Where a study's trials keep their checkpoints while they run."""
    return STATE_DIR / "tune" / name


# sections a trial's validation loss does not depend on: changing them continues the study
NOT_IN_TRIALS = {"evaluation", "gate", "registry", "monitor"}


def study_name(config: PipelineConfig) -> str:
    """Same data, training settings and search space -> same study, whatever tune.trials, tune.budget_minutes or
    the sections a trial never uses (gate, registry, evaluation, monitor) say."""
    settings = config.model_dump(mode="json", exclude=NOT_IN_TRIALS)
    settings["tune"] = {"space": {k: v.model_dump() for k, v in config.search_space().items()},
                        "enqueue": config.tune.enqueue, "pruner": config.tune.pruner.model_dump()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{config.model_name}-{digest}"


def study_storage(heartbeat_seconds: int, max_retry: int):
    """SQLite RDBStorage under the state folder, with heartbeats and a retry of killed trials."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    path = STATE_DIR / "tune" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: "experimental" since Optuna 2.8
        # SQLite suits serial trials (Optuna advises against it for parallel ones); a study runs one at a time
        return RDBStorage(f"sqlite:///{path}", heartbeat_interval=heartbeat_seconds,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                              max_retry=max_retry, inherit_intermediate_values=True))


def dotted_value(config: PipelineConfig, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def in_space(spec: SearchRange, value) -> bool:
    return value in spec.choices if spec.type == "categorical" else spec.low <= value <= spec.high


def settle_stale_trials(study, heartbeat_seconds: int) -> list[int]:
    """Mark trials left RUNNING by a killed process as FAIL (queueing their retry); return their numbers.
    A trial that keeps beating past the grace period (2 heartbeats) belongs to a live process: StudyBusy."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if running:
        run_logger("castbot.tune").info("study %s: trial(s) %s are marked running; waiting up to %d s for their "
                                        "heartbeats to go stale", study.study_name, sorted(running),
                                        3 * heartbeat_seconds + 5)
    deadline = time.monotonic() + 3 * heartbeat_seconds + 5
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        fail_stale_trials(study)
        still = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not still:
            break
        if time.monotonic() > deadline:
            raise StudyBusy(f"trial {still[0]} of study {study.study_name} still writes heartbeats: another process "
                            "is running this study; wait for it to end or stop it, then run again")
        time.sleep(1)
    return sorted(running)


@task(name="open_study", cache_policy=NO_CACHE)
def open_study(config: PipelineConfig):
    """Create or load the study; a new one first tries the profile's own settings, then tune.enqueue."""
    import optuna

    tune, space = config.tune, config.search_space()
    logger = run_logger("castbot.tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=tune.pruner.startup_trials,
                                          n_warmup_steps=tune.pruner.warmup_steps)
              if tune.pruner.kind == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=study_storage(tune.heartbeat_seconds, tune.max_retry),
                                study_name=study_name(config), direction="minimize", pruner=pruner,
                                load_if_exists=True)
    # reseeded by the trials so far: a resumed study does not redraw the settings it already tried
    study.sampler = optuna.samplers.TPESampler(seed=config.training.seed + len(study.trials),
                                               n_startup_trials=max(2, min(10, tune.trials // 3)))
    if not study.trials:
        own = {key: dotted_value(config, key) for key, spec in space.items()
               if in_space(spec, dotted_value(config, key))}
        study.enqueue_trial(own, user_attrs={"origin": "profile"})
        for i, settings in enumerate(tune.enqueue):
            study.enqueue_trial(settings, user_attrs={"origin": f"tune.enqueue[{i}]"})
    failed = settle_stale_trials(study, tune.heartbeat_seconds)
    if failed:
        logger.warning("study %s: trial(s) %s were left running by a killed process: marked FAIL, retried up to "
                       "%d time(s)", study.study_name, failed, tune.max_retry)
    return study


def suggest(trial, space: dict[str, SearchRange]) -> dict:
    """One value per setting from the trial (an enqueued trial gets its fixed values)."""
    settings = {}
    for key, spec in space.items():
        if spec.type == "categorical":
            settings[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.type == "int":
            settings[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            settings[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return settings


def set_dotted(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def apply_settings(config: PipelineConfig, settings: dict) -> PipelineConfig:
    """The profile with a trial's settings, validated like a loaded profile."""
    raw = config.model_dump(mode="json", exclude_unset=True)
    for key, value in settings.items():
        set_dotted(raw, key, value)
    return PipelineConfig.model_validate(raw)


def trial_rows(study) -> list[dict]:
    """One row per trial: number, state, objective, last step reported, settings, minutes, a cast's members'
    validation figures."""
    rows = []
    for t in study.trials:
        minutes = ((t.datetime_complete - t.datetime_start).total_seconds() / 60
                   if t.datetime_complete and t.datetime_start else None)
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "last_step": max(t.intermediate_values, default=None), "params": t.params,
                     "origin": t.user_attrs.get("origin", "sampler"), "minutes": minutes,
                     "members": t.user_attrs.get("members", {})})
    return rows


def members_of(rows: list[dict]) -> list[str]:
    """The cast members the trials were judged on, in the order the first judged trial names them."""
    return list(dict.fromkeys(name for r in rows for name in r["members"]))


def trials_markdown(study, keys: list[str]) -> str:
    """The trials as a markdown table, best first among the complete ones; a cast's with each member's validation
    perplexity."""
    from castbot.common.text import markdown_cell

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else markdown_cell(str(value))

    rows = sorted(trial_rows(study), key=lambda r: (r["value"] is None, r["value"] or 0, r["trial"]))
    members = members_of(rows)
    head = ["trial", "state", "validation loss" + (" (mean over members)" if members else ""), "last step", *keys,
            *(f"{name} perplexity" for name in members), "minutes", "origin"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["trial"], r["state"], r["value"] if r["value"] is not None else "",
                  r["last_step"] if r["last_step"] is not None else "", *(r["params"].get(k, "") for k in keys),
                  *(r["members"].get(name, {}).get("perplexity", "") for name in members),
                  r["minutes"] if r["minutes"] is not None else "", r["origin"]]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def importances(study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA), or {} with fewer than 2 complete trials or nothing varied."""
    import optuna
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def save_plots(study, folder: Path, with_importances: bool) -> list[Path]:
    """Optuna's optimisation history and (with >= 2 complete trials) parameter importances, as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    folder.mkdir(parents=True, exist_ok=True)
    plots = {"optimization_history.png": views.plot_optimization_history}
    if with_importances:
        plots["param_importances.png"] = views.plot_param_importances
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, plot in plots.items():
            axes = plot(study)
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figure.savefig(folder / name, dpi=100)
            plt.close(figure)
            paths.append(folder / name)
    return paths


@task(name="publish_study", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_study(study, config: PipelineConfig, study_run_id: str) -> dict:
    """The best trial's settings and value on the study run (a cast's: best_members_eval_loss and each member's
    best_validation_perplexity_<member>), its plots and trials table (MLflow and Prefect)."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from prefect.artifacts import create_markdown_artifact

    client = MlflowClient()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {study.study_name} has no complete trial: nothing to choose from")
    best = study.best_trial
    weights = importances(study)
    table = trials_markdown(study, list(config.search_space()))
    for key, value in best.params.items():
        client.set_tag(study_run_id, f"best.{key}", str(value))  # tags, not params: a resumed study may change them
    client.set_tag(study_run_id, "best.trial", str(best.number))
    members = best.user_attrs.get("members", {})
    client.log_metric(study_run_id, "best_members_eval_loss" if members else "best_eval_loss", best.value,
                      step=len(study.trials))
    for name, figures in members.items():
        client.log_metric(study_run_id, f"best_validation_perplexity_{slug(name)}", figures["perplexity"],
                          step=len(study.trials))
    client.log_metric(study_run_id, "trials_finished", float(len(study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))))
    for path in save_plots(study, study_folder(study.study_name) / "plots", len(complete) >= 2 and bool(weights)):
        client.log_artifact(study_run_id, str(path))
    client.log_text(study_run_id, table, "trials.md")
    create_markdown_artifact(f"# Study {study.study_name}\n\nObjective: {objective_text(config)} (lower is better). "
                             f"Best: trial {best.number}, {best.value:.4f}{member_figures(members)}.\n\n{table}\n",
                             key="study-trials", description=f"{config.character or config.model_name}: trials of "
                             "the study")
    return {"best_trial": best.number, "best_value": best.value, "best_params": dict(best.params),
            "importances": weights, "table": table, "best_members": members}


def member_figures(members: dict[str, dict]) -> str:
    """'; validation perplexity per member: Ada 12.3, Bram 15.1' for a cast trial's members, '' for none."""
    if not members:
        return ""
    return "; validation perplexity per member: " + ", ".join(f"{name} {m['perplexity']:.4g}"
                                                              for name, m in members.items())


def evidence_lines(study, summary: dict, config: PipelineConfig, study_run_id: str, minutes: float) -> list[str]:
    """The study's evidence for the tuned profile's header comments."""
    rows = trial_rows(study)
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    own = next((r for r in rows if r["origin"] == "profile" and r["state"] == "COMPLETE"), None)
    lines = [f"Study {study.study_name} ({datetime.now(UTC):%Y-%m-%d}): {len(rows)} trials "
             f"({states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed), "
             f"{minutes:.1f} min in this run.",
             f"Objective: {objective_text(config)} (the test split was not read).",
             f"Best: trial {summary['best_trial']}, {summary['best_value']:.4f}"
             + member_figures(summary["best_members"])
             + (f"; the profile's own settings (trial {own['trial']}): {own['value']:.4f}" if own else "")
             + (member_figures(own["members"]) if own and own["trial"] != summary["best_trial"] else "") + "."]
    def show(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    changed = [f"{k} {show(dotted_value(config, k))} -> {show(v)}" for k, v in summary["best_params"].items()
               if dotted_value(config, k) != v]
    lines.append("Changed: " + ", ".join(changed) if changed else "Changed: nothing (the profile's own settings won).")
    if summary["importances"]:
        lines.append("Importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items()))
    lines.append(f"Trials: MLflow experiment {config.tune.experiment}, study run {study_run_id}.")
    return lines


@task(name="write_tuned_profile", cache_policy=NO_CACHE)
def write_tuned_profile(profile_path: str | None, config: PipelineConfig, settings: dict, evidence: list[str],
                        name: str) -> str:
    """The profile with the best settings, beside the original (NAME.tuned.yaml) with the evidence as comments;
    without a profile file (the Prefect form), the whole config under the study's folder."""
    import yaml

    if profile_path:
        source = Path(profile_path)
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        target = source.with_name(f"{source.name.removesuffix('.yaml').removesuffix('.tuned')}.tuned.yaml")
        origin = f"the settings of {source.name}, with the study's best"
    else:
        raw = config.model_dump(mode="json", exclude_unset=True)
        target = study_folder(name) / f"{config.model_name}.tuned.yaml"
        origin = "the flow's config, with the study's best"
    for key, value in settings.items():
        set_dotted(raw, key, float(f"{value:.4g}") if isinstance(value, float) else value)  # readable, within 0.05%
    header = [f"Written by python -m flows.tune: {origin}.", *evidence]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(f"# {line}\n" for line in header) + yaml.safe_dump(raw, sort_keys=False),
                      encoding="utf-8")
    return str(target)
