"""The conversation log: every answered turn and its feedback (castbot/chatlog/store.py)."""

from castbot.chatlog.store import ChatLog, TurnRecord

__all__ = ["ChatLog", "TurnRecord"]
