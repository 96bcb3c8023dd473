"""Monitor flow: a window of the chat log for the profile's champion, compared with what that version was trained on.

    python -m flows.monitor configs/rick-and-morty.yaml [--window-hours 24]

Prints one line per check (`drift: yes (AUC 0.81 > threshold 0.70 ...)`); records an MLflow run in the
`monitoring` experiment and a Prefect artifact; emits castbot.bot.drifted / castbot.bot.degraded events, which
start the profile's training deployment (deployments/prefect.yaml). Exit 0 with a verdict (drift or not, or not
enough data), 1 when there is no champion, no reference or no chat log. A cast model's turns are judged per member,
each against that member's own reference: `Morty: drift: yes (...)`, metrics drift_auc_morty, events naming
Morty in their payload's "characters".
"""

import argparse
import sys
import tempfile
from pathlib import Path

from prefect import flow, task

from castbot.chatlog.store import ChatLogError
from castbot.config.monitor import MonitorConfig
from castbot.config.profile import ConfigError, PipelineConfig, load_profile
from castbot.scores.drift import Check, cast_window_checks, window_checks
from tasks.data.lineage import publish_markdown
from tasks.monitor.steps import (
    cast_turns,
    chat_log_url,
    emit_events,
    log_monitoring_run,
    read_window,
    report_markdown,
)
from tasks.release.trained_on import MonitorError, load_reference


@task(name="load_champion_reference")  # no retries: a missing champion or reference is an answer, not a hiccup
def load_champion_reference(model_name: str) -> tuple[str, dict]:
    """The champion's version and the reference stored with it."""
    return load_reference(model_name)


@task(name="check_window")
def check_window(reference: dict, turns, monitor: MonitorConfig, cast: bool = False) -> list[Check]:
    """Drift, reply and health checks of the window (castbot/scores/drift.py); a cast's per member."""
    return (cast_window_checks if cast else window_checks)(reference, turns, monitor)


@flow(name="monitor-character-bot")
def monitor(config: PipelineConfig, profile: str | None = None, window_hours: float | None = None) -> dict:
    """Check the served champion's recent turns for drift and degradation; emit an event when a threshold is crossed."""
    name, profile = config.model_name, profile or config.model_name
    hours = window_hours or config.monitor.window_hours
    version, reference = load_champion_reference(config.model_name)
    turns, left_out = read_window(chat_log_url(), name, version, hours)
    checks = check_window(reference, turns, config.monitor, cast=config.cast is not None)
    members = cast_turns(turns, reference)  # {} for one character
    publish_markdown(report_markdown(name, version, checks, left_out, hours, members), key="monitor-report",
                     description=f"{name} version {version}: drift and health")
    with tempfile.TemporaryDirectory() as workdir:
        run_id = log_monitoring_run(name, version, profile, checks, len(turns), workdir, members)
    events = emit_events(name, version, profile, checks)
    return {"model_name": name, "version": version, "turns": len(turns), "left_out": left_out,
            "lines": [c.line() for c in checks], "events": events, "run_id": run_id,
            **({"characters": members} if members else {})}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="the profile YAML the bot was trained from")
    parser.add_argument("--window-hours", type=float, default=None, help="hours of the log to read "
                        "(default: the profile's monitor.window_hours)")
    args = parser.parse_args(argv)
    try:
        result = monitor(load_profile(args.profile), profile=Path(args.profile).stem, window_hours=args.window_hours)
    except (ConfigError, MonitorError, ChatLogError) as exc:
        print(f"castbot: {exc}", file=sys.stderr)
        return 1
    print(f"{result['model_name']} version {result['version']}: {result['turns']} turns"
          + (f" ({result['left_out']} of other versions left out)" if result["left_out"] else ""))
    if result.get("characters"):
        print("cast: " + ", ".join(f"{name} {n} turns" for name, n in result["characters"].items()))
    for line in result["lines"]:
        print(line)
    if result["events"]:
        print("events: " + ", ".join(result["events"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
