"""Training flow: transcript -> validated dialogues -> fine-tuned model -> perplexity gate -> MLflow champion.

    python -m flows.train configs/demo.yaml
"""

import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from prefect import flow

from castbot.common.errors import DataError
from castbot.compat.prefect_start import exits_on_server_timeout
from castbot.config.profile import (
    ConfigError,
    PipelineConfig,
    also_train_on_profiles,
    characters,
    check_cast_format,
    load_profile,
    speakers_of,
)
from castbot.model.dialogue import DialogueFormat
from castbot.model.folder import ModelCard
from castbot.model.pretrained import ModelFetchError
from tasks.data.clean import clean_transcript, publish_cleaning_report
from tasks.data.dialogues import build_dialogues
from tasks.data.feedback import FeedbackAdded, FeedbackFound, add_approved_feedback, log_feedback, read_feedback
from tasks.data.freshness import INPUTS_TAG, check_freshness, inputs_key, training_inputs
from tasks.data.ingest import load_transcript
from tasks.data.lineage import log_data_lineage, report_dir, resume_data_key
from tasks.data.validate import validate_dialogue, validate_raw
from tasks.evaluate.judge import build_judge, publish_replies
from tasks.evaluate.perplexity import encode_test_split, evaluate_model, load_bot, log_scores
from tasks.evaluate.replies import sample_replies
from tasks.evaluate.scores import ScoreSet
from tasks.release.bento import TestSplit, build_bento, withdraw_bento
from tasks.release.gate import gate_candidate
from tasks.release.registry import (
    ChampionMoved,
    download_champion,
    finish_run,
    promote_champion,
    register_model,
    start_run,
    tag_run,
)
from tasks.release.trained_on import build_reference, store_reference
from tasks.train.base_model import base_reference, prepare_base_model
from tasks.train.checkpoints import clear_work_folder, work_folder
from tasks.train.finetune import fine_tune


def training_texts(samples: list[dict]) -> list[str]:
    """Every distinct line seen in the training split, for the offline tokenizer."""
    return sorted({line for s in samples for line in [*s["context"], s["response"]]})


def prepared_transcript(profile: PipelineConfig, reports: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One profile's transcript as read (with its sha256) and cleaned, validated by the profile's own rules."""
    frame = load_transcript(profile.data)
    validate_raw(frame, profile.data.path, profile.validation, reports)
    cleaned, cleaning = clean_transcript(frame, profile.cleaning)
    publish_cleaning_report(cleaning, profile.data.path, reports)
    validate_dialogue(cleaned, profile.data.path, speakers_of(profile, cleaned), profile.validation, reports)
    return frame, cleaned


class TrainingData(NamedTuple):
    """What the data steps produce."""

    frame: pd.DataFrame  # the transcript as read; attrs["sha256"]
    cleaned: pd.DataFrame
    profiles: dict[str, PipelineConfig]  # data.also_train_on, by name
    others: dict[str, tuple[pd.DataFrame, pd.DataFrame]]  # theirs as read and cleaned, by name
    liked: FeedbackFound  # data.feedback: the approved liked turns in the conversation log (none when off)
    splits: dict[str, list[dict]]
    feedback: FeedbackAdded  # which of them joined the training split, and why the others did not


def liked_turns(config: PipelineConfig) -> FeedbackFound:
    """data.feedback's approved liked turns, cleaned and checked, read from the conversation log once per run,
    with the count awaiting review; none when it is off."""
    return read_feedback(config) if config.data.feedback.enabled else FeedbackFound()


def training_data(config: PipelineConfig, reports: str, profiles: dict[str, PipelineConfig] | None = None,
                  liked: FeedbackFound | None = None) -> TrainingData:
    """The flow's data steps: every transcript read, validated and cleaned, then one set of dialogue splits.
    profiles and liked as the flow read them (None: read here). Benchmarks call this too, so their test split is
    the flow's."""
    profiles = also_train_on_profiles(config) if profiles is None else profiles
    liked = liked_turns(config) if liked is None else liked
    frame, cleaned = prepared_transcript(config, reports)
    others = {name: prepared_transcript(profile, str(Path(reports) / "also_train_on" / name))
              for name, profile in profiles.items()}
    feedback = feedback_splits(config, cleaned, others, liked)
    return TrainingData(frame, cleaned, profiles, others, liked, feedback.splits, feedback)


def feedback_splits(config: PipelineConfig, cleaned: pd.DataFrame,
                    others: dict[str, tuple[pd.DataFrame, pd.DataFrame]], liked: FeedbackFound) -> FeedbackAdded:
    """Train/validation/test samples from the cleaned transcripts by config.dialogue, with the approved feedback
    turns added to training (deduplicated, capped at data.feedback.max_share), and the counts."""
    more = {name: other_cleaned for name, (_, other_cleaned) in others.items()}
    splits = build_dialogues(cleaned, speakers_of(config, cleaned), config.dialogue, config.training.seed, more)
    return add_approved_feedback(splits, config, liked)


def dialogue_splits(config: PipelineConfig, cleaned: pd.DataFrame, others: dict[str, tuple[pd.DataFrame, pd.DataFrame]],
                    liked: FeedbackFound) -> dict[str, list[dict]]:
    """feedback_splits' samples alone (flows/tune.py: one set per trial's dialogue settings)."""
    return feedback_splits(config, cleaned, others, liked).splits


def evaluate(config: PipelineConfig, data: TrainingData, base: str, fmt: DialogueFormat, model_path: str,
             champion: dict | None, run_id: str) -> tuple[ScoreSet, str]:
    """Sample replies, then the candidate, the base and the champion on the test split, each loaded once and judged
    by one Judge; returns their scores and the replies markdown."""
    max_length = config.dialogue.max_length
    candidate = load_bot(model_path, max_length)
    sample_replies(candidate, run_id, candidate.format.character)
    untuned = load_bot(base, max_length, fmt)
    judge = build_judge(data.cleaned, data.splits, config, untuned)
    test = encode_test_split(data.splits["test"], untuned, max_length)
    scores = ScoreSet(candidate=evaluate_model(candidate, test, judge), base=evaluate_model(untuned, test, judge),
                      champion=evaluate_model(load_bot(champion["path"], max_length), test, judge)
                      if champion else None)
    log_scores(run_id, scores)
    return scores, publish_replies(judge, scores, run_id)


@flow(name="train-character-bot")
def train(config: PipelineConfig, skip_if_unchanged: bool = False) -> dict:
    """Train a character bot from a transcript and promote it if it beats the champion. skip_if_unchanged: end at
    once when data, config and code equal the champion's (or the latest version's) inputs (deployments: true)."""
    from tasks.data.tokenize import choose_format, tokenize_dialogues

    profiles, liked = also_train_on_profiles(config), liked_turns(config)  # read once, passed on
    # approved turns only: a like that awaits review is not new data for the schedule
    inputs = inputs_key(training_inputs(config, profiles, liked.samples))
    if skip_if_unchanged and (skipped := check_freshness(config.model_name, inputs)):
        return {"model_name": config.model_name, "skipped": skipped, "promoted": False}
    reports = report_dir()
    data = training_data(config, reports, profiles, liked)
    splits, cast = data.splits, characters(config, data.cleaned)  # cast: [character] for one character
    workdir = work_folder(resume_data_key(data.frame, profiles, data.others, splits["train"]), config.digest())
    run_id = start_run(config, data.frame.attrs["sha256"], workdir.name)
    try:
        log_data_lineage(run_id, data.cleaned, config.data.path, reports, splits,
                         {name: (profiles[name].data.path, other) for name, (_, other) in data.others.items()})
        if config.data.feedback.enabled:
            log_feedback(run_id, data.feedback)
        base = prepare_base_model(config.base_model, training_texts(splits["train"]), config.offline_model,
                                  config.training.seed)
        fmt = choose_format(base, config.dialogue, cast[0], config.show)
        check_cast_format(config, fmt.style)
        datasets = tokenize_dialogues(splits, base, config.dialogue, fmt)
        card = ModelCard(format=fmt, max_length=config.dialogue.max_length,
                         base_model=base_reference(config.base_model, base), cast=tuple(cast) if config.cast else None)
        model_path = fine_tune(base, datasets, config.training, str(workdir), run_id, card)
        champion = download_champion(config.model_name, str(workdir / "champion"))
        scores, replies = evaluate(config, data, base, fmt, model_path, champion, run_id)
        decision = gate_candidate(scores, config.gate, replies)
        tag_run(run_id, decision.as_tags() | ({"castbot.character": cast[0], "castbot.cast": ",".join(cast)}
                                              if config.cast else {}))
        version = register_model(run_id, model_path, config, decision.as_tags())
        store_reference(run_id, config.model_name, version,
                        build_reference(splits, cast[0], config.monitor.reference_size, config.monitor.seed,
                                        cast if config.cast else None),
                        {INPUTS_TAG: inputs})
        test = TestSplit(splits["test"], config.dialogue.max_length, scores.candidate.perplexity)
        bento = build_bento(config.model_name, version, openvino=config.registry.openvino, test=test,
                            max_increase=config.registry.openvino_max_increase, folder=model_path) \
            if decision.promote and config.registry.build_bento else None
        if decision.promote:  # last: a run that fails anywhere before this leaves the champion where it was
            try:
                promote_champion(config.model_name, version, champion["version"] if champion else None, bento)
            except ChampionMoved:
                if bento:  # castbot-chat:latest stays the champion's
                    withdraw_bento(config.model_name, version, bento)
                raise
        clear_work_folder(workdir)
    except BaseException:
        finish_run(run_id, "FAILED")
        raise
    finish_run(run_id, "FINISHED")
    return {"run_id": run_id, "model_name": config.model_name, "version": version, "promoted": decision.promote,
            "reason": decision.reason, "perplexity": scores.candidate.perplexity, "bento": bento,
            "feedback": data.feedback.summary() if config.data.feedback.enabled else None}


@exits_on_server_timeout
def main(argv: list[str]) -> int:
    skip = "--skip-if-unchanged" in argv  # as the scheduled deployments run: nothing new ends the run at once
    argv = [arg for arg in argv if arg != "--skip-if-unchanged"]
    if len(argv) != 1:
        print("usage: python -m flows.train PROFILE.yaml [--skip-if-unchanged]", file=sys.stderr)
        return 2
    try:
        result = train(load_profile(argv[0]), skip_if_unchanged=skip)
    except (ConfigError, DataError, ModelFetchError, ChampionMoved) as exc:
        print(f"castbot: {exc}", file=sys.stderr)
        return 1
    if result.get("skipped"):
        print(f"{result['model_name']}: {result['skipped']}")
        return 0
    verdict = "promoted to champion" if result["promoted"] else "not promoted"
    print(f"{result['model_name']} version {result['version']}: {verdict} "
          f"(test perplexity {result['perplexity']:.3f}). {result['reason']}")
    if result["feedback"]:
        print(f"data.feedback: {result['feedback']}")
    if result["bento"]:
        print(f"Bento {result['bento']}: bentoml serve {result['bento']} --host 127.0.0.1 --port 3000")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
