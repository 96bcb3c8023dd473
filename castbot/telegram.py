"""Telegram bot: a thin client of a running castbot service; each Telegram chat is one castbot conversation.

    TELEGRAM_BOT_TOKEN=123:ABC python -m castbot.telegram --url http://127.0.0.1:3000

The token is read from TELEGRAM_BOT_TOKEN only (never the command line) and never logged: httpx's request log
lines carry it in the URL, so they are silenced and every log line is scrubbed of it. TELEGRAM_API_URL points at
another Bot API server (self-hosted, or a test's fake; default https://api.telegram.org): requests go to
{root}/bot{token}/{method}. Long-polls getUpdates; updates are handled concurrently, one chat's turns in order.
Commands: /start (who the character is), /help, /forget (or /reset: delete this chat's conversation on the service,
DELETE /conversations/{id}), /as NAME (a cast model: talk to another member), /good and /bad (rate the last
reply through POST /feedback). CASTBOT_API_KEY is the
bot's key when the service needs one (never the command line, never logged).
"""

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections import deque

import httpx

logger = logging.getLogger("castbot.telegram")

TELEGRAM_LIMIT = 4096  # characters in one Telegram message
TYPING_EVERY_S = 4.0  # Telegram clears "typing..." after about 5 s
HELP = ("Write to me and I answer in character. /forget deletes our conversation, /good or /bad rates my last "
        "reply, /start says who I am.")
DOWN = "I can't reach my voice right now (the chat service is down). Please try again in a minute."
SLOW = "I took too long to answer. Please try again."
BUSY = "Too many people are talking to me right now. Please try again in a moment."


def split_message(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Text in pieces of at most limit characters, cut at the last newline or space before the limit."""
    pieces = []
    while len(text) > limit:
        cut = max(text.rfind("\n", 0, limit), text.rfind(" ", 0, limit))
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut])
        text = text[cut:].lstrip()
    return [*pieces, text] if text else pieces or [""]


def refusal_text(resp: httpx.Response) -> str:
    """What to tell the user about a refused request (the cause is logged by the caller)."""
    if resp.status_code == 503:
        return BUSY
    if resp.status_code == 429:
        return f"You're writing faster than I may answer: try again in {resp.headers.get('Retry-After', 'a few')} s."
    if resp.status_code == 404:  # a cast model and a name outside its cast: the error lists the cast
        with contextlib.suppress(ValueError, AttributeError):
            return "I can't answer as that character. " + resp.json()["error"] + " (/as NAME)"
    if resp.status_code == 401:  # the bot's CASTBOT_API_KEY is missing or wrong: its operator must fix it
        return "I'm not allowed to reach my voice right now. Please tell my operator."
    if resp.status_code == 400:
        try:
            details = resp.json().get("detail", [])
        except ValueError:
            details = []
        if any(d.get("loc", [None])[-1:] == ["message"] and "at most" in d.get("msg", "") for d in details):
            return "That message is too long for me: please send a shorter one."
        return "I couldn't take that message. Try rephrasing it."
    return "Something went wrong on my side. Please try again later."


class Conversation:
    """One Telegram chat's castbot conversation: the last `keep` turns, its conversation_id and last turn_id."""

    def __init__(self, keep: int):
        self.history: deque[dict] = deque(maxlen=keep)
        self.conversation_id: str | None = None
        self.turn_id: str | None = None
        self.character: str | None = None  # a cast model's member (/as NAME); None: the model's first
        self.lock = asyncio.Lock()  # one turn at a time per chat; other chats run meanwhile

    def reset(self) -> None:
        self.history.clear()
        self.conversation_id = self.turn_id = None

    def add(self, message: str, answer: dict) -> None:
        self.conversation_id, self.turn_id = answer["conversation_id"], answer["turn_id"]
        self.history.append({"speaker": "user", "text": message})
        if answer["reply"].strip():
            self.history.append({"speaker": answer.get("character") or "bot", "text": answer["reply"]})


class CastbotClient:
    """The castbot service as the bot uses it: who the character is, one chat turn, a rating."""

    def __init__(self, url: str, timeout_s: float, max_new_tokens: int | None, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers)
        self.max_new_tokens = max_new_tokens

    async def identity(self) -> dict:
        resp = await self.http.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]

    async def chat(self, conversation: Conversation, message: str) -> httpx.Response:
        body = {"history": list(conversation.history), "message": message}
        if conversation.conversation_id:
            body["conversation_id"] = conversation.conversation_id
        if self.max_new_tokens:
            body["max_new_tokens"] = self.max_new_tokens
        if conversation.character:
            body["character"] = conversation.character
        return await self.http.post("/chat", json=body)

    async def feedback(self, turn_id: str, rating: int) -> httpx.Response:
        return await self.http.post("/feedback", json={"turn_id": turn_id, "rating": rating})

    async def forget(self, conversation_id: str) -> httpx.Response:
        return await self.http.delete(f"/conversations/{conversation_id}")


async def keep_typing(bot, chat_id: int) -> None:
    """Show "typing..." until cancelled, refreshed before Telegram clears it."""
    from telegram.constants import ChatAction
    from telegram.error import TelegramError

    while True:
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING)
        except TelegramError as exc:
            logger.warning("sendChatAction failed: %s", exc)
        await asyncio.sleep(TYPING_EVERY_S)


async def answer(client: CastbotClient, conversation: Conversation, message: str, chat_id: int) -> str:
    """The character's reply to a message, or a short friendly note when the service fails (cause logged)."""
    try:
        resp = await client.chat(conversation, message)
    except httpx.TimeoutException as exc:
        logger.error("chat %s: the service timed out (%s)", chat_id, type(exc).__name__)
        return SLOW
    except httpx.HTTPError as exc:
        logger.error("chat %s: the service is unreachable: %s: %s", chat_id, type(exc).__name__, exc)
        return DOWN
    if resp.status_code != 200:
        logger.error("chat %s: the service answered %s: %s", chat_id, resp.status_code, resp.text[:300])
        return refusal_text(resp)
    body = resp.json()
    conversation.add(message, body)
    return body["reply"].strip() or "..."


def build_application(token: str, api_root: str, client: CastbotClient, keep: int, concurrency: int):
    """The python-telegram-bot Application with castbot's handlers, pointed at api_root."""
    from telegram import Update
    from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters

    def conversation_of(context: ContextTypes.DEFAULT_TYPE) -> Conversation:
        return context.chat_data.setdefault("conversation", Conversation(keep))

    async def say(update: Update, context: ContextTypes.DEFAULT_TYPE, text: str) -> None:
        for piece in split_message(text):
            await context.bot.send_message(update.effective_chat.id, piece)

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        try:
            who = await client.identity()
        except httpx.HTTPError as exc:
            logger.error("chat %s: /start cannot read the model: %s: %s", update.effective_chat.id,
                         type(exc).__name__, exc)
            return await say(update, context, DOWN)
        character = who.get("character") or "a character bot"
        await say(update, context, f"Hi, I'm {character} (castbot model {who['id']} v{who.get('version', '?')}). "
                                   + HELP)

    async def help_(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await say(update, context, HELP)

    async def forget(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        conversation = conversation_of(context)
        async with conversation.lock:
            if conversation.conversation_id is not None:
                try:
                    resp = await client.forget(conversation.conversation_id)
                except httpx.HTTPError as exc:
                    logger.error("chat %s: conversation not deleted: %s", update.effective_chat.id, type(exc).__name__)
                    return await say(update, context, DOWN + " Nothing was deleted yet: send /forget again later.")
                if resp.status_code not in (200, 404):  # 404: already gone (a purge, an earlier /forget)
                    return await say(update, context, "I couldn't delete our conversation: " + refusal_text(resp))
            conversation.reset()
        await say(update, context, "Forgotten: our conversation is deleted and we start afresh.")

    async def speak_as(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        conversation, name = conversation_of(context), " ".join(context.args or []).strip()
        async with conversation.lock:
            conversation.character = name or None
        await say(update, context, f"Now {name} answers." if name else "Back to the default character.")

    async def rate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        conversation = conversation_of(context)
        rating = 1 if update.message.text.startswith("/good") else -1
        if conversation.turn_id is None:
            return await say(update, context, "There is no reply of mine to rate yet.")
        try:
            resp = await client.feedback(conversation.turn_id, rating)
        except httpx.HTTPError as exc:
            logger.error("chat %s: feedback not sent: %s", update.effective_chat.id, type(exc).__name__)
            return await say(update, context, DOWN)
        await say(update, context, "Thanks, noted." if resp.status_code == 200 else "I couldn't save that rating.")

    async def message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        conversation, chat_id = conversation_of(context), update.effective_chat.id
        async with conversation.lock:
            typing = asyncio.create_task(keep_typing(context.bot, chat_id))
            try:
                reply = await answer(client, conversation, update.message.text, chat_id)
            finally:
                typing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await typing
            await say(update, context, reply)

    async def failed(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        logger.error("update not handled: %s: %s", type(context.error).__name__, context.error)

    async def close_client(_app) -> None:
        await client.http.aclose()

    root = api_root.rstrip("/")
    app = (Application.builder().token(token).base_url(f"{root}/bot").base_file_url(f"{root}/file/bot")
           .concurrent_updates(concurrency).post_shutdown(close_client).build())
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("help", help_))
    app.add_handler(CommandHandler(["forget", "reset"], forget))
    app.add_handler(CommandHandler("as", speak_as))
    app.add_handler(CommandHandler(["good", "bad"], rate))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, message))
    app.add_error_handler(failed)
    return app


class Redact(logging.Filter):
    """Replaces the bot token wherever it appears in a log line."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.secret in text:
            record.msg, record.args = text.replace(self.secret, "<token>"), ()
        return True


def setup_logging(token: str) -> None:
    """INFO logs without the token: httpx logs each request URL ({root}/bot{token}/getUpdates) at INFO."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(Redact(token))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m castbot.telegram", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="castbot service URL.")
    parser.add_argument("--keep", type=int, default=8, help="History turns kept per chat (the service's "
                        "CASTBOT_SERVE_MAX_HISTORY_TURNS bounds it too).")
    parser.add_argument("--max-new-tokens", type=int, help="Reply length limit, in tokens (default: the service's).")
    parser.add_argument("--timeout", type=float, default=60, help="Seconds to wait for one reply.")
    parser.add_argument("--concurrency", type=int, default=64, help="Updates handled at once (all chats).")
    args = parser.parse_args(argv)
    token = os.environ.get("TELEGRAM_BOT_TOKEN", "").strip()
    if not token:
        print("set TELEGRAM_BOT_TOKEN to the token @BotFather gave you (it is never taken from the command line)",
              file=sys.stderr)
        return 2
    setup_logging(token)
    api_root = os.environ.get("TELEGRAM_API_URL", "https://api.telegram.org")
    client = CastbotClient(args.url, args.timeout, args.max_new_tokens, os.environ.get("CASTBOT_API_KEY") or None)
    app = build_application(token, api_root, client, args.keep, args.concurrency)
    logger.info("polling %s for updates; castbot service at %s", api_root, args.url)
    app.run_polling(allowed_updates=["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
