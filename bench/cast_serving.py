"""A cast model served: throughput with requests spread over four characters against all for one, and the time to
first token of a scene's later lines and a long chat's last turn with OpenVINO's prefix caching on and off.

    python -m bench.cast_serving --model rick-and-morty-cast-bot --only spread
    python -m bench.cast_serving --bento castbot-chat:TAG --only prefix

spread: the cast profile's held-out contexts from 32 clients against the served Bento (its default engine), every
request for the first member, then the same requests spread over the cast in turn; alternated twice (the machine
drifts). Goal: spread/one >= 0.95 requests/s (one model answers everyone in the same batch).
prefix: the Bento's OpenVINO export alone (no server), one conversation at a time, greedy: a scene of 8 lines after
an opening (the cast in turn) and a chat of 20 turns, each turn prompted with everything said so far, as /scene and a
client of /chat send it. Time to first token per turn, with prefix caching on and off, alternated twice. Goal: the
scene's 8th line and the chat's 20th turn within 1.5x of their first.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from bench.serve_throughput import champion_bento, held_out_chats, print_ratio, serve_and_measure

CAST_PROFILE = Path(__file__).resolve().parent.parent / "configs" / "rick-and-morty-cast.yaml"
OPENINGS = ["The garage is on fire again.", "Who took the portal gun?", "Dinner is ready, everyone sit down.",
            "There is a giant head in the sky."]
CHAT = ["Hi, who are you?", "What are you working on?", "Is it dangerous?", "Can I help?", "Why not?",
        "What is a portal gun?", "Where do you go with it?", "Have you been to other planets?", "Which was the worst?",
        "What happened there?", "Do you regret it?", "What about your family?", "Do they know?", "Should I tell them?",
        "What is the meaning of life?", "Are you serious?", "Tell me a secret.", "I promise I won't tell.",
        "Okay, goodbye then.", "Wait, one more question: are you a genius?"]


def model_folder(bento: str) -> Path:
    import bentoml

    [tag] = [m.tag for m in bentoml.get(bento).info.all_models]
    return Path(bentoml.models.get(tag).path)


def spread(bento: str, cast: list[str], args) -> int:
    """Served throughput, every request for cast[0] against requests spread over the cast, alternated twice."""
    chats = held_out_chats(args.profile)
    asked = {"one": [{**chat, "character": cast[0]} for chat in chats],
             "spread": [{**chat, "character": cast[i % len(cast)]} for i, chat in enumerate(chats)]}
    print(f"{len(chats)} held-out contexts of {args.profile.name}; cast {', '.join(cast)}", flush=True)
    runs = [serve_and_measure(f"served, {how} ({len(cast) if how == 'spread' else 1} characters)", bento, "auto",
                              True, asked[how], args) for how in ("spread", "one") * 2]
    print(f"engine: {runs[0]['engine']}")
    print_ratio(runs, "spread/one", 0.95)
    return 0


async def first_token_s(engine, turns: list[tuple[str, str]], speaker: str, max_new_tokens: int) -> tuple:
    """(seconds to the first piece, prompt tokens, the whole reply) of one greedy turn."""
    started = time.perf_counter()
    stream = engine.stream(turns, character=speaker, temperature=0, max_new_tokens=max_new_tokens)
    first = None
    async for _ in stream:
        first = first or time.perf_counter() - started
    return first or time.perf_counter() - started, stream.reply.prompt_tokens, stream.reply.reply.strip()


async def conversations(engine, cast: list[str], rounds: int, max_new_tokens: int) -> dict[str, list[list]]:
    """Per kind ("scene", "chat"): per round, each turn's (seconds to first token, prompt tokens)."""
    timed = {"scene": [], "chat": []}
    for r in range(rounds):
        said, turns = [("", OPENINGS[r % len(OPENINGS)])], []
        for i in range(8):
            speaker = cast[i % len(cast)]
            seconds, tokens, reply = await first_token_s(engine, said, speaker, max_new_tokens)
            turns.append((seconds, tokens))
            said.append((speaker, reply or "..."))
        timed["scene"].append(turns)
        said, turns = [], []
        for message in CHAT:
            said.append(("", f"{message} ({r})" if r else message))  # each round its own prompts past the system line
            seconds, tokens, reply = await first_token_s(engine, said, cast[0], max_new_tokens)
            turns.append((seconds, tokens))
            said.append((cast[0], reply or "..."))
        timed["chat"].append(turns)
    return timed


def prefix(bento: str, cast: list[str], args) -> int:
    """Time to first token per turn, prefix caching on and off, alternated twice."""
    from castbot.model.bot import Bot
    from castbot.serve.engines.openvino import OpenVINOEngine, served_export

    folder = model_folder(bento)
    bot = Bot.load(str(folder), torch_threads=args.torch_threads, weights=False)
    results = {True: {"scene": [], "chat": []}, False: {"scene": [], "chat": []}}
    for caching in (True, False) * 2:
        engine = OpenVINOEngine(bot, served_export(folder), max_batch_size=4, threads=args.torch_threads,
                                prefix_caching=caching)
        try:
            asyncio.run(first_token_s(engine, [("", "warm up")], cast[0], 4))
            timed = asyncio.run(conversations(engine, cast, args.rounds, args.max_new_tokens))
        finally:
            engine.close()
        for kind in timed:
            results[caching][kind] += timed[kind]
    print(f"bento {bento}; {2 * args.rounds} rounds per setting, greedy, max_new_tokens {args.max_new_tokens}; "
          "median time to first token (ms) and prompt tokens")
    summary = []
    for kind, last in (("scene", 8), ("chat", 20)):
        for caching in (True, False):
            rounds = results[caching][kind]
            ms = [1000 * statistics.median(r[t][0] for r in rounds) for t in range(last)]
            tokens = [rounds[0][t][1] for t in range(last)]
            setting = "on " if caching else "off"
            print(f"{kind:6} prefix caching {setting}: turn 1 {ms[0]:6.1f} ms ({tokens[0]} tokens), "
                  f"turn {last} {ms[-1]:6.1f} ms ({tokens[-1]} tokens), ratio {ms[-1] / ms[0]:.2f}; every turn: "
                  + " ".join(f"{m:.0f}" for m in ms))
            later = statistics.mean(ms[1:])
            print(f"{'':6} mean of turns 2-{last}: {later:.1f} ms, {later / ms[0]:.2f}x turn 1")
            summary.append(f"{kind}_{'on' if caching else 'off'}={ms[-1] / ms[0]:.2f}")
    print(f"summary: last/first turn TTFT {' '.join(summary)} (goal <= 1.5 with caching on)")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cast_serving", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="Registered cast model whose champion's Bento to use.")
    which.add_argument("--bento", help="Bento tag of a cast model, e.g. castbot-chat:abc123.")
    parser.add_argument("--only", choices=["spread", "prefix"], help="One of the two measurements.")
    parser.add_argument("--profile", type=Path, default=CAST_PROFILE, help="Cast profile whose held-out contexts "
                        "the spread clients send.")
    parser.add_argument("--requests", type=int, default=256, help="Timed requests per spread phase.")
    parser.add_argument("--concurrency", type=int, default=32, help="Concurrent clients in the spread phases.")
    parser.add_argument("--rounds", type=int, default=2, help="Scenes and chats per prefix setting and pass.")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="Longest line in the prefix runs.")
    parser.add_argument("--torch-threads", type=int, default=0, help="CPU threads (0: one per core).")
    parser.add_argument("--dtype", default="fast", help="Weights' dtype (CASTBOT_SERVE_DTYPE).")
    parser.add_argument("--phase-timeout", type=float, default=180, help="Seconds before a spread phase stops.")
    args = parser.parse_args(argv)

    from castbot.common.settings import use_project_state
    from castbot.model.folder import read_card

    use_project_state()
    bento = args.bento or champion_bento(args.model)
    card = read_card(model_folder(bento))
    cast = list(card.cast) if card and card.cast else []
    if len(cast) < 2:
        print(f"castbot: {bento} serves one character: bench.cast_serving needs a cast model", file=sys.stderr)
        return 2
    if args.only in (None, "spread"):
        spread(bento, cast[:4], args)
    if args.only in (None, "prefix"):
        prefix(bento, cast[:4], args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
