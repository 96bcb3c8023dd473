"""Study flow: an Optuna search over the profile's tune.space, every trial a nested MLflow run; the best settings
are written as NAME.tuned.yaml beside the profile and (unless --no-train) trained by the training flow, so the
winner meets the same gate, registry and Bento path as any candidate. The search itself promotes nothing.

    python -m flows.tune PROFILE.yaml [--trials N] [--budget-minutes M] [--no-train]

The data steps (read, validate, clean, dialogues, base model, tokenisation) run once per study. Settings that
change the samples (dialogue.context_turns, dialogue.max_length) build and tokenise them once per distinct value,
kept for the study; the offline-tiny stand-in's tokenizer is built once from the profile's own samples.
A cast profile's trials are judged on every member (tasks/search/trial.py: member_objective) and the study reports
the best trial's validation perplexity per member.
"""

import argparse
import sys
import time
from pathlib import Path

from prefect import flow

from castbot.common.errors import DataError
from castbot.compat.prefect_start import exits_on_server_timeout
from castbot.config.data import DialogueConfig
from castbot.config.profile import ConfigError, PipelineConfig, characters, check_cast_format, load_profile
from castbot.model.pretrained import ModelFetchError
from flows.train import dialogue_splits, train, training_data, training_texts
from tasks.data.lineage import report_dir
from tasks.release.registry import ChampionMoved, finish_run
from tasks.search.study import (
    StudyBusy,
    apply_settings,
    evidence_lines,
    open_study,
    publish_study,
    study_folder,
    suggest,
    write_tuned_profile,
)
from tasks.search.trial import PRUNED, run_trial, start_study_run
from tasks.train.base_model import base_reference, prepare_base_model


@flow(name="tune-character-bot")
def tune(config: PipelineConfig, profile_path: str | None = None, trials: int | None = None,
         budget_minutes: float | None = None, train_winner: bool = True) -> dict:
    """Search the profile's tune.space for the lowest validation loss (a cast: the mean of its members'); write the
    winner's profile; train it."""
    import optuna

    from castbot.model.folder import ModelCard
    from tasks.data.tokenize import choose_format, tokenize_dialogues

    if config.training.processes > 1:
        raise ConfigError("training.processes: a study trains its trials in one process; set it to 1")
    started = time.monotonic()
    target = trials or config.tune.trials
    budget = budget_minutes or config.tune.budget_minutes
    data = training_data(config, report_dir())
    base = prepare_base_model(config.base_model, training_texts(data.splits["train"]), config.offline_model,
                              config.training.seed)
    cast = characters(config, data.cleaned)  # [character] for one character
    fmt = choose_format(base, config.dialogue, cast[0], config.show)
    check_cast_format(config, fmt.style)
    datasets = {config.dialogue.model_dump_json(): (data.splits["validation"],
                                                     tokenize_dialogues(data.splits, base, config.dialogue, fmt))}

    def datasets_for(dialogue: DialogueConfig):
        """The validation samples and tokenised splits for a trial's dialogue settings, built once per value."""
        key = dialogue.model_dump_json()
        if key not in datasets:
            splits = dialogue_splits(config.model_copy(update={"dialogue": dialogue}), data.cleaned, data.others,
                                     data.liked)
            datasets[key] = splits["validation"], tokenize_dialogues(splits, base, dialogue, fmt)
        return datasets[key]

    study = open_study(config)
    study_run_id = start_study_run(config, study)
    folder = study_folder(study.study_name)

    def objective(trial) -> float:
        settings = suggest(trial, config.search_space())
        trial_config = apply_settings(config, settings)
        card = ModelCard(format=fmt, max_length=trial_config.dialogue.max_length,
                         base_model=base_reference(config.base_model, base), cast=tuple(cast) if config.cast else None)
        validation, tokenized = datasets_for(trial_config.dialogue)
        judged = {"validation": validation, "cast": cast} if config.cast else {}  # a cast: judged on every member
        state = run_trial(trial, trial_config, settings, base, tokenized, card, study_run_id, str(folder), **judged,
                          return_state=True)  # "Pruned" or "Completed" in the UI
        outcome = state.result()
        if outcome.state == PRUNED:
            raise optuna.TrialPruned(outcome.message)
        return outcome.value

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = target - len(study.get_trials(deepcopy=False, states=finished))
    try:
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, timeout=budget * 60 if budget else None)
        summary = publish_study(study, config, study_run_id)
        evidence = evidence_lines(study, summary, config, study_run_id, (time.monotonic() - started) / 60)
        tuned = write_tuned_profile(profile_path, config, summary["best_params"], evidence, study.study_name)
    except BaseException:
        finish_run(study_run_id, "FAILED")
        raise
    finish_run(study_run_id, "FINISHED")
    winner = load_profile(tuned)  # the written profile must load like any other
    trained = train(winner) if train_winner else None
    return {"study": study.study_name, "study_run_id": study_run_id, "best_trial": summary["best_trial"],
            "best_value": summary["best_value"], "best_params": summary["best_params"], "profile": tuned,
            "trials": len(study.get_trials(deepcopy=False, states=finished)), "train": trained,
            "table": summary["table"], "best_members": summary["best_members"]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="profile YAML; its tune: section sets the search")
    parser.add_argument("--trials", type=int, help="finished trials to reach (default tune.trials)")
    parser.add_argument("--budget-minutes", type=float, help="start no trial after this (default tune.budget_minutes)")
    parser.add_argument("--no-train", action="store_true", help="write the tuned profile, do not train it")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1 or args.budget_minutes is not None and args.budget_minutes <= 0:
        parser.error("--trials and --budget-minutes must be positive")
    return args


@exits_on_server_timeout
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        result = tune(load_profile(args.profile), str(Path(args.profile)), args.trials, args.budget_minutes,
                      not args.no_train)
    except (ConfigError, DataError, ModelFetchError, ChampionMoved, StudyBusy) as exc:
        print(f"castbot: {exc}", file=sys.stderr)
        return 1
    members = result["best_members"]
    print(f"study {result['study']}: {result['trials']} trials; best trial {result['best_trial']}, validation loss "
          f"{'(mean over members) ' if members else ''}{result['best_value']:.4f} with {result['best_params']}")
    if members:
        print("validation perplexity per member: " + ", ".join(f"{name} {m['perplexity']:.3f}"
                                                               for name, m in members.items()))
    print(f"tuned profile: {result['profile']}")
    if result["train"]:
        t = result["train"]
        print(f"{t['model_name']} version {t['version']}: {'promoted to champion' if t['promoted'] else 'not promoted'}"
              f" (test perplexity {t['perplexity']:.3f}). {t['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
