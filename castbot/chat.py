"""Terminal chat against a running castbot service; keeps the conversation history.

    CASTBOT_API_KEY=KEY python -m castbot.chat --url http://127.0.0.1:3000
Type a message and Enter; /good or /bad [comment] rates the last reply, /reset starts afresh, /forget deletes this
conversation on the service (DELETE /conversations/{id}), /as NAME talks to another member of a cast model,
/quit (or Ctrl-D) leaves. The key (when the service needs
one) comes from CASTBOT_API_KEY only, never the command line.
"""

import argparse
import json
import os
import sys

import httpx


def refusal(resp: httpx.Response) -> dict:
    """{'error': 'STATUS: what was refused'} from a 4xx/5xx body."""
    try:
        data = resp.json()
    except ValueError:
        return {"error": f"{resp.status_code}: {resp.text[:200]}"}
    fields = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in data.get("detail", []))
    return {"error": f"{resp.status_code}: {fields or data.get('error', resp.text)}"}


RATINGS = {"/good": 1, "/bad": -1}


def rate(client: httpx.Client, turn_id: str | None, command: str) -> str:
    """POST /feedback for the last reply: '/good' or '/bad', optionally followed by a comment; what to show."""
    word, _, comment = command.partition(" ")
    if turn_id is None:
        return "(nothing to rate yet)"
    body = {"turn_id": turn_id, "rating": RATINGS[word], **({"comment": comment.strip()} if comment.strip() else {})}
    try:
        resp = client.post("/feedback", json=body)
    except httpx.HTTPError as exc:
        return f"(feedback not sent: {exc})"
    if resp.status_code != 200:
        return f"(feedback refused: {refusal(resp)['error']})"
    return "(thanks: feedback saved)"


def forget(client: httpx.Client, conversation_id: str | None) -> str:
    """DELETE /conversations/{id}: the service forgets this conversation's turns and ratings; what to show."""
    if conversation_id is None:
        return "(nothing to forget yet)"
    try:
        resp = client.delete(f"/conversations/{conversation_id}")
    except httpx.HTTPError as exc:
        return f"(not deleted: {exc})"
    if resp.status_code != 200:
        return f"(not deleted: {refusal(resp)['error']})"
    return f"(deleted {resp.json().get('deleted_turns', 0)} turns of conversation {conversation_id})"


def ask(client: httpx.Client, history: list[dict], message: str, max_new_tokens: int | None, on_event,
        conversation_id: str | None = None, character: str | None = None) -> dict:
    """POST /chat/stream; on_event(name, data) for each server-sent event; the final 'done' data, or an 'error'
    entry naming what was refused."""
    body = {"history": history, "message": message}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if character is not None:
        body["character"] = character
    with client.stream("POST", "/chat/stream", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return refusal(resp)
        event = "message"
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                on_event(event, data)
                if event == "done":
                    return data
            elif not line:
                event = "message"
    return {"error": "the stream ended without a reply"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m castbot.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="Service URL.")
    parser.add_argument("--max-new-tokens", type=int, help="Reply length limit, in tokens.")
    parser.add_argument("--keep", type=int, default=20,
                        help="Turns of history to send (the server truncates by tokens).")
    parser.add_argument("--verbose", action="store_true", help="Show model version and prompt size after each reply.")
    args = parser.parse_args(argv)

    history: list[dict] = []
    conversation_id = turn_id = character = None
    interactive = sys.stdin.isatty()

    written: list[str] = []  # pieces of the reply being printed

    def show(event: str, data: dict) -> None:
        """Print the reply as it is written: the name at the start, each piece as it comes, a newline at the end."""
        if event == "start":
            print(f"{data['character'] or 'bot'}>", end="", flush=True)
            written.clear()
        elif event == "message":
            print(data["text"] if written else " " + data["text"].lstrip(), end="", flush=True)
            written.append(data["text"])
        elif event == "done":
            print(flush=True)

    key = os.environ.get("CASTBOT_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    with httpx.Client(base_url=args.url, timeout=60, headers=headers) as client:
        while True:
            try:
                message = input("you> " if interactive else "").strip()
            except EOFError:
                return 0
            if message in ("/quit", "/exit"):
                return 0
            if message in ("/reset", "/forget"):
                if message == "/forget":
                    print(forget(client, conversation_id), flush=True)
                history.clear()
                conversation_id = turn_id = None
                continue
            if message.startswith("/as "):
                character = message.removeprefix("/as ").strip() or None
                print(f"(now talking to {character or 'the default character'})", flush=True)
                continue
            if message.split(" ")[0] in RATINGS:
                print(rate(client, turn_id, message), flush=True)
                continue
            if not message:
                continue
            try:
                answer = ask(client, history, message, args.max_new_tokens, show, conversation_id, character)
            except httpx.HTTPError as exc:
                print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
                return 1
            if "error" in answer:
                print(f"(refused: {answer['error']})", file=sys.stderr)
                continue
            conversation_id, turn_id = answer.get("conversation_id", conversation_id), answer.get("turn_id")
            if args.verbose:
                print(f"  [{answer['model_name']} v{answer['model_version']}, prompt {answer['prompt_tokens']} tokens]",
                      flush=True)
            history.append({"speaker": "you", "text": message})
            if answer["reply"].strip():
                history.append({"speaker": answer["character"], "text": answer["reply"]})
            del history[: -args.keep]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
