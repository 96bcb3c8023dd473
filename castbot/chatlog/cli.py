"""python -m castbot.chatlog: export, review, delete and purge the conversation log at CASTBOT_CHATLOG_URL.

    python -m castbot.chatlog export --since 2026-11-01 [--model NAME] [--redact] --out turns.parquet   # or .jsonl
    python -m castbot.chatlog review [--model NAME] [--limit N]           # liked turns that await review
    python -m castbot.chatlog review --approve TURN_ID ... --reject TURN_ID ...
    python -m castbot.chatlog delete --conversation ID
    python -m castbot.chatlog purge [--days N]    # default: CASTBOT_CHATLOG_RETENTION_DAYS (30), e.g. from cron

Exit 2 on bad arguments, 1 when the log cannot be opened or a reviewed id is not a liked turn.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from castbot.chatlog.export import export_turns
from castbot.chatlog.review import format_review
from castbot.chatlog.store import ChatLog, ChatLogError, default_url, retention_days


def _iso_date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2026-11-01 or "
                                         "2026-11-01T12:00:00+00:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _out_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".parquet", ".jsonl"):
        raise argparse.ArgumentTypeError(f"{text!r}: the output must end in .parquet or .jsonl")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m castbot.chatlog",
                                     description="Export, review, delete or purge the chat log at CASTBOT_CHATLOG_URL "
                                                 "(default: chatlog.db under CASTBOT_HOME).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write turns with their feedback to a .parquet or .jsonl file")
    export.add_argument("--since", type=_iso_date, required=True, help="first time included (ISO, UTC if no zone)")
    export.add_argument("--model", help="only turns of this registered model name")
    export.add_argument("--out", type=_out_path, required=True, help="turns.parquet or turns.jsonl")
    export.add_argument("--redact", action="store_true",
                        help="mask e-mail addresses, phone numbers, IP addresses and client names")
    review = commands.add_parser("review", help="list liked turns awaiting review, or approve / reject them "
                                 "(only approved liked turns become training samples)")
    review.add_argument("--model", help="only turns of this registered model name")
    review.add_argument("--limit", type=_positive_int, help="list at most N turns (oldest first)")
    review.add_argument("--approve", nargs="+", default=[], metavar="TURN_ID", help="liked turns to train on")
    review.add_argument("--reject", nargs="+", default=[], metavar="TURN_ID", help="liked turns never to train on")
    delete = commands.add_parser("delete", help="delete one conversation's turns and feedback")
    delete.add_argument("--conversation", required=True, help="the conversation id")
    purge = commands.add_parser("purge", help="delete turns older than N days")
    purge.add_argument("--days", type=_positive_int, help="default: CASTBOT_CHATLOG_RETENTION_DAYS (30)")
    return parser


def review(log: ChatLog, args: argparse.Namespace) -> int:
    """List the pending liked turns, or record the approvals and rejections given; the exit status."""
    if both := set(args.approve) & set(args.reject):
        print(f"castbot.chatlog: both approved and rejected: {' '.join(sorted(both))}", file=sys.stderr)
        return 2
    if not (args.approve or args.reject):
        pending = log.pending_reviews(model_name=args.model, limit=args.limit)
        if pending.empty:
            print("no liked turns await review")
        else:
            print(f"{format_review(pending)}\n\n{len(pending)} liked turns await review: approve or reject them with "
                  "python -m castbot.chatlog review --approve TURN_ID ... --reject TURN_ID ...")
        return 0
    status = 0
    for state, ids in (("approved", args.approve), ("rejected", args.reject)):
        if not ids:
            continue
        done = log.set_review(ids, state)
        print(f"{state} {len(done)} turns")
        if missing := [i for i in ids if i not in done]:
            print(f"castbot.chatlog: not a liked turn in the log: {' '.join(missing)}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 with a message on bad arguments
    try:
        if args.command == "purge" and args.days is None:
            args.days = retention_days()
            if args.days is None:
                print("CASTBOT_CHATLOG_RETENTION_DAYS keeps every turn: nothing purged (give --days N to purge)")
                return 0
        log = ChatLog(default_url())
    except ChatLogError as exc:
        print(f"castbot.chatlog: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "export":
            n = export_turns(log, args.since, args.model, args.out, redact=args.redact)
            print(f"exported {n} turns to {args.out}" + (" (redacted)" if args.redact else ""))
        elif args.command == "review":
            return review(log, args)
        elif args.command == "delete":
            print(f"deleted {log.delete_conversation(args.conversation)} turns of conversation {args.conversation}")
        else:
            print(f"purged {log.purge(timedelta(days=args.days))} turns older than {args.days} days")
    except ChatLogError as exc:
        print(f"castbot.chatlog: {exc}", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0
