"""The monitor flow's steps: read a window of the chat log, record the verdicts in MLflow (with a plot of their
history), publish them to Prefect, and emit the events that start a retraining."""

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.scores.drift import Check
from tasks.release.trained_on import MonitorError

EXPERIMENT = "monitoring"
DRIFT_CHECKS = {"drift"}  # the domain classifier alone decides drift: vocabulary and length are its context
EVENTS = {"drifted": "castbot.bot.drifted", "degraded": "castbot.bot.degraded"}


def chat_log_url() -> str:
    """CASTBOT_CHATLOG_URL, or the default SQLite file under the state folder; MonitorError when the log is off
    or its SQLite file does not exist (opening it would create an empty log and report 'not enough data')."""
    from castbot.chatlog.store import default_url

    if os.environ.get("CASTBOT_CHATLOG", "on").strip().lower() in ("off", "0", "false", "no"):  # as ChatLog.from_env
        raise MonitorError("CASTBOT_CHATLOG is off: there is no chat log to monitor; serve the bot with the log on")
    url = default_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise MonitorError(f"no chat log at {url.removeprefix('sqlite:///')}: serve the bot (its log is written "
                           "there by default) or set CASTBOT_CHATLOG_URL to the log the service writes")
    return url


@task(name="read_window", retries=2, retry_delay_seconds=2)
def read_window(url: str, model_name: str, version: str, hours: float) -> tuple[pd.DataFrame, int]:
    """The turns of model_name's given version in the last `hours`, and how many turns of other versions the
    window held (left out: they were answered by another model)."""
    from castbot.chatlog.store import ChatLog

    turns = ChatLog(url).turns(model_name, since=datetime.now(UTC) - timedelta(hours=hours))
    mine = turns["model_version"].astype(str) == str(version)
    return turns[mine].reset_index(drop=True), int((~mine).sum())


def cast_turns(turns: pd.DataFrame, reference: dict) -> dict[str, int]:
    """A cast's turns in the window per member, the reference's members first (0 when silent), then anyone else
    the log names; {} for one character (a reference without "cast")."""
    if not reference.get("cast"):
        return {}
    counts = turns["character"].fillna("").astype(str).value_counts()
    others = sorted(set(counts.index) - set(reference["cast"]))
    return {name: int(counts.get(name, 0)) for name in [*reference["cast"], *others]}


def alarms(checks: list[Check]) -> dict[str, list[Check]]:
    """The checks behind each event: drifted (the domain classifier) and degraded (replies and health)."""
    fired = [c for c in checks if c.alarm]
    return {"drifted": [c for c in fired if c.name in DRIFT_CHECKS],
            "degraded": [c for c in fired if c.name not in DRIFT_CHECKS and c.name not in {"vocabulary", "length"}]}


def suffix(character: str) -> str:
    """What a cast member's names carry, as the training run's per-member metrics do (test_perplexity_candidate_morty):
    drift_auc_morty, monitor.drift_morty; nothing for a one-character model."""
    from castbot.config.profile import slug

    return f"_{slug(character)}" if character else ""


def figures_of(checks: list[Check]) -> dict[str, float]:
    """Every figure of every check, one flat dict (MLflow metric names, a cast member's with its suffix)."""
    return {key + suffix(check.character): float(value) for check in checks for key, value in check.figures.items()}


def characters_of(checks: list[Check]) -> list[str]:
    """The cast members the checks name, in order; [] for a one-character model."""
    return list(dict.fromkeys(c.character for c in checks if c.character))


def history_plot(history: pd.DataFrame, path: Path, cast: list[str] = ()) -> Path:
    """One small panel per figure over the monitoring runs' start times, a line per cast member (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = {suffix(name): name for name in cast}  # slugs hold no "_": a suffix is never part of another
    panels: dict[str, dict[str, str]] = {}  # figure -> {member ("" none): column}
    for column in (c for c in history.columns if c != "time"):
        end = next((end for end in ends if column.endswith(end)), "")
        panels.setdefault(column.removesuffix(end) if end else column, {})[ends.get(end, "")] = column
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.6 * len(panels) + 0.5), sharex=True, squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(["", *cast])}  # a member keeps its colour in every panel
    for ax, (figure, lines) in zip(axes[:, 0], panels.items()):
        for member, column in lines.items():
            ax.plot(history["time"], history[column], marker="o", markersize=3, color=colors[member],
                    label=member or "whole window")
        ax.set_ylabel(figure, rotation=0, ha="right", fontsize=8)
        if any(lines):
            ax.legend(fontsize=6, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@task(name="log_monitoring_run", retries=2, retry_delay_seconds=2)
def log_monitoring_run(model_name: str, version: str, profile: str, checks: list[Check], turns: int,
                       workdir: str, cast_turns: dict[str, int] | None = None) -> str:
    """An MLflow run in the `monitoring` experiment: the figures as metrics, verdicts as tags, the report, and a
    PNG of every figure over this bot's monitoring runs so far; returns the run id. A cast's run also carries
    each member's turns in the window (cast_turns) as turns_<member>, and its metrics and tags the member's
    suffix (drift_auc_morty, monitor.drift_morty)."""
    from mlflow import MlflowClient

    from tasks.release.registry import experiment_artifacts

    strangers = {c.character for c in checks if c.name == "reference"}  # in the log, not in the cast
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(EXPERIMENT, artifact_location=experiment_artifacts(EXPERIMENT)))
    run = client.create_run(experiment_id, run_name=f"{model_name}-monitor",
                            tags={"castbot.model_name": model_name, "castbot.model_version": version,
                                  "castbot.profile": profile,
                                  **({"castbot.cast": ",".join(n for n in cast_turns if n not in strangers)}
                                     if cast_turns else {}),
                                  **{f"monitor.{c.name}{suffix(c.character)}": c.verdict for c in checks}})
    run_id = run.info.run_id
    members = {f"turns{suffix(name)}": float(n) for name, n in (cast_turns or {}).items()}
    for key, value in {"turns": float(turns), **members, **figures_of(checks)}.items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, "\n".join(c.line() for c in checks) + "\n", "monitor.txt")
    past = client.search_runs([experiment_id], filter_string=f"tags.`castbot.model_name` = '{model_name}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    history = pd.DataFrame([{"time": pd.to_datetime(r.info.start_time, unit="ms"), **r.data.metrics} for r in past])
    history = history.drop(columns=[c for c in history.columns if c != "time" and history[c].isna().all()])
    plot = history_plot(history, Path(workdir) / "monitor_history.png", list(cast_turns or {}))
    client.log_artifact(run_id, str(plot))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def verdict_table(checks: list[Check]) -> str:
    rows = "\n".join(f"| {c.name} | {'**' + c.verdict + '**' if c.alarm else c.verdict} | {c.detail} |" for c in checks)
    return f"| check | verdict | figures |\n|---|---|---|\n{rows}"


def report_markdown(model_name: str, version: str, checks: list[Check], left_out: int, hours: float,
                    cast_turns: dict[str, int] | None = None) -> str:
    """The monitor's verdicts as a markdown table for the Prefect artifact; a cast's as a table per member, under
    a line listing the members, their turns in the window and the checks that crossed a threshold."""
    note = f"\n\n{left_out} turns of other versions in the window were left out." if left_out else ""
    title = f"### {model_name} version {version}: last {hours:g} h of the chat log\n\n"
    members = characters_of(checks)
    if not members:
        return f"{title}{verdict_table(checks)}{note}\n"
    summary, tables = [], []
    for name in members:
        own = [c for c in checks if c.character == name]
        alarmed = ", ".join(c.name for c in own if c.alarm)
        summary.append(f"- **{name}**: {(cast_turns or {}).get(name, 0)} turns, "
                       + (f"**{alarmed}**" if alarmed else "no alarm"))
        tables.append(f"#### {name}\n\n{verdict_table(own)}")
    return (f"{title}Each cast member's turns judged against its own reference:\n\n" + "\n".join(summary)
            + "\n\n" + "\n\n".join(tables) + f"{note}\n")


@task(name="emit_events")
def emit_events(model_name: str, version: str, profile: str, checks: list[Check]) -> list[str]:
    """A Prefect event per crossed kind (castbot.bot.drifted / castbot.bot.degraded) with the figures in its
    payload (a cast's also the members whose checks crossed, as "characters"), on resource castbot.bot.<model_name>;
    returns the events' names."""
    from prefect.events import emit_event

    sent = []
    for kind, fired in alarms(checks).items():
        if not fired:
            continue
        emit_event(event=EVENTS[kind],
                   resource={"prefect.resource.id": f"castbot.bot.{model_name}", "prefect.resource.name": model_name,
                             "castbot.profile": profile, "castbot.model_version": version},
                   payload={"profile": profile, "model_name": model_name, "model_version": version,
                            "checks": [c.line() for c in fired], "figures": figures_of(checks),
                            **({"characters": members} if (members := characters_of(fired)) else {})})
        sent.append(EVENTS[kind])
    return sent
