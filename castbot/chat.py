"""Terminal chat against a running castbot service; keeps the conversation history.

    python -m castbot.chat --url http://127.0.0.1:3000
Type a message and Enter; /reset forgets the history, /quit (or Ctrl-D) leaves.
"""

import argparse
import sys

import httpx


def ask(client: httpx.Client, history: list[dict], message: str, max_new_tokens: int | None) -> dict:
    """POST /chat; the service's JSON reply, or an 'error' entry naming what was refused."""
    body = {"history": history, "message": message}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    resp = client.post("/chat", json=body)
    data = resp.json()
    if resp.status_code != 200:
        fields = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in data.get("detail", []))
        return {"error": f"{resp.status_code}: {fields or data.get('error', resp.text)}"}
    return data


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m castbot.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="Service URL.")
    parser.add_argument("--max-new-tokens", type=int, help="Reply length limit, in tokens.")
    parser.add_argument("--keep", type=int, default=20, help="Turns of history to send (the server truncates by tokens).")
    parser.add_argument("--verbose", action="store_true", help="Show model version and prompt size after each reply.")
    args = parser.parse_args(argv)

    history: list[dict] = []
    interactive = sys.stdin.isatty()
    with httpx.Client(base_url=args.url, timeout=60) as client:
        while True:
            try:
                message = input("you> " if interactive else "").strip()
            except EOFError:
                return 0
            if message in ("/quit", "/exit"):
                return 0
            if message == "/reset":
                history.clear()
                continue
            if not message:
                continue
            try:
                answer = ask(client, history, message, args.max_new_tokens)
            except httpx.HTTPError as exc:
                print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
                return 1
            if "error" in answer:
                print(f"(refused: {answer['error']})", file=sys.stderr)
                continue
            print(f"{answer['character'] or 'bot'}> {answer['reply']}", flush=True)
            if args.verbose:
                print(f"  [{answer['model_name']} v{answer['model_version']}, prompt {answer['prompt_tokens']} tokens]",
                      flush=True)
            history.append({"speaker": "you", "text": message})
            if answer["reply"].strip():
                history.append({"speaker": answer["character"], "text": answer["reply"]})
            del history[: -args.keep]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
