"""The conversation log: every answered turn, who asked, and its feedback (castbot/chatlog/store.py); the review of
liked turns (review.py); what it deletes and purges (retention.py); the command line (cli.py)."""

from castbot.chatlog.store import ChatLog, ChatLogError, ChatLogUnavailable, NotOwner, TurnRecord

__all__ = ["ChatLog", "ChatLogError", "ChatLogUnavailable", "NotOwner", "TurnRecord"]
