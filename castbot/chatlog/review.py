"""Review of liked turns: a liked reply reaches training only once a person approved it.

    python -m castbot.chatlog review [--model NAME]            # pending liked turns, with their context and reply
    python -m castbot.chatlog review --approve TURN_ID ... --reject TURN_ID ...

A client can steer a reply with a made-up history and like it; the reviewer reads that history, so a planted
trigger is seen before the nightly run learns it. A rating that changes goes back to pending.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import sqlalchemy as sa

from castbot.chatlog.schema import COMPLETE, REVIEW_STATES, feedback_table, turn_frame, turns_table, utc_now

if TYPE_CHECKING:
    import pandas as pd


class ReviewQueue:
    """ChatLog's review methods (ChatLog supplies _reading and _writing)."""

    def pending_reviews(self, model_name: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """Liked, complete turns that await review, oldest first: turns()' columns."""
        f = feedback_table.c
        query = (sa.select(turns_table, f.rating, f.comment, f.review)
                 .join(feedback_table, f.turn_id == turns_table.c.turn_id)
                 .where(f.rating == 1, f.review == "pending", turns_table.c.finish_reason.in_(COMPLETE))
                 .order_by(turns_table.c.time, turns_table.c.turn_id).limit(limit))
        if model_name is not None:
            query = query.where(turns_table.c.model_name == model_name)
        with self._reading() as conn:
            rows = conn.execute(query).mappings().all()
        return turn_frame(rows, ["rating", "comment", "review"])

    def set_review(self, turn_ids: Iterable[str], state: str) -> list[str]:
        """Mark liked turns approved, rejected (or pending again); the ids changed. An id that is not a liked
        turn (unknown, unrated, disliked) is left out of the answer."""
        if state not in REVIEW_STATES:
            raise ValueError(f"review state must be one of {', '.join(REVIEW_STATES)}, got {state!r}")
        ids = list(dict.fromkeys(turn_ids))
        liked = sa.and_(feedback_table.c.turn_id.in_(ids), feedback_table.c.rating == 1)
        with self._writing() as conn:
            found = conn.execute(sa.select(feedback_table.c.turn_id).where(liked)).scalars().all()
            conn.execute(sa.update(feedback_table).where(liked)
                         .values(review=state, reviewed_at=None if state == "pending" else utc_now()))
        return [i for i in ids if i in set(found)]


def format_review(frame: pd.DataFrame) -> str:
    """Pending turns as a reviewer reads them: who, when, which model, then the context lines and the reply."""
    blocks = []
    for row in frame.itertuples(index=False):
        lines = [f"turn {row.turn_id}  {row.time:%Y-%m-%d %H:%M} UTC  {row.model_name} v{row.model_version}  "
                 f"client {row.client or '(unknown)'}  conversation {row.conversation_id}"]
        lines += [f"  {speaker or 'user'}: {text}" for speaker, text in row.history]
        lines.append(f"  user: {row.message}")
        lines.append(f"  -> {row.character or 'bot'}: {row.reply}")
        if isinstance(row.comment, str) and row.comment:
            lines.append(f"  (comment: {row.comment})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
