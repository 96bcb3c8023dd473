"""Serving throughput: 32 concurrent /chat clients against the Bento with adaptive batching, the same Bento with
batching off, and batched generate() on the same prompts with no server (the limit).

    python -m bench.serve_throughput --model demo-bot            # the champion's Bento (built if missing)
    python -m bench.serve_throughput --bento castbot-chat:TAG --requests 256

Only 127.0.0.1 is contacted; each phase stops after --requests requests or --phase-timeout seconds.
Figures: requests/s and generated tokens/s (new tokens incl. end-of-turn, as the service counts them) over the
timed phase, after a warm-up; latency is per request, as a client sees it (direct: the batch it was in).
"""

import argparse
import asyncio
import collections
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGES = [
    "Hello, how are you?", "What is your name?", "Do you like music?", "Tell me a joke.",
    "What do you do for fun?", "Are you a robot?", "Where do you live?", "What time is it?",
    "Do you have any friends?", "What is the meaning of life?", "Can you help me?", "What is your favourite food?",
    "Do you read books?", "How old are you?", "Is it going to rain?", "What are you thinking about?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def champion_bento(model_name: str) -> str:
    """The Bento tag recorded on the champion version; built now if it has none."""
    from mlflow import MlflowClient

    from tasks.bento import BENTO_TAG_KEY, build_bento

    version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    return version.tags.get(BENTO_TAG_KEY) or build_bento.fn(model_name, version.version)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(name: str, seconds: float, latencies: list[float], tokens: int, errors: collections.Counter) -> dict:
    return {"name": name, "requests": len(latencies), "errors": sum(errors.values()), "by_status": dict(errors),
            "seconds": seconds,
            "req_s": len(latencies) / seconds, "tok_s": tokens / seconds,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


async def drive(url: str, requests: int, concurrency: int, max_new_tokens: int, deadline: float) -> tuple:
    """`concurrency` clients send /chat until `requests` are done; (seconds, latencies, tokens, errors)."""
    import httpx

    counter = iter(range(requests))
    latencies, tokens, errors = [], 0, collections.Counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for i in counter:
            if time.monotonic() > deadline:
                return
            start = time.monotonic()
            resp = await http.post("/chat", json={"message": MESSAGES[i % len(MESSAGES)],
                                                  "max_new_tokens": max_new_tokens})
            if resp.status_code != 200:
                errors[resp.status_code] += 1
                continue
            latencies.append(time.monotonic() - start)
            tokens += resp.json()["new_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.monotonic() - start, latencies, tokens, errors


def serve_and_measure(name: str, bento: str, batching: bool, args) -> dict:
    """Start `bentoml serve`, warm it up, time args.requests chats from args.concurrency clients, stop it."""
    import httpx

    port = free_port()
    env = {**os.environ, "CASTBOT_SERVE_BATCHING": str(batching).lower(),
           "CASTBOT_SERVE_MAX_CONCURRENCY": str(4 * args.concurrency),
           "CASTBOT_SERVE_MAX_BATCH_SIZE": str(args.concurrency), "CASTBOT_SERVE_TORCH_THREADS": str(args.torch_threads)}
    log = Path(tempfile.mkdtemp(prefix="castbot-bench-")) / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", bento,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        # warm-up: the batch dispatcher spends its first calls measuring latency
        asyncio.run(drive(url, 2 * args.concurrency, args.concurrency, args.max_new_tokens, time.monotonic() + 120))
        seconds, latencies, tokens, errors = asyncio.run(
            drive(url, args.requests, args.concurrency, args.max_new_tokens, time.monotonic() + args.phase_timeout))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    if errors:
        print(f"{name}: refused {dict(errors)} (HTTP status: count); server log {log}", flush=True)
    return summary(name, seconds, latencies, tokens, errors)


def direct(bento: str, args) -> dict:
    """Batched generate_batch() in this process on the same prompts and settings, in batches of args.concurrency."""
    import bentoml

    from castbot.bot import Bot
    from castbot.serving import Prompt, generate_batch

    [model_tag] = [m.tag for m in bentoml.get(bento).info.all_models]
    bot = Bot.load(bentoml.models.get(model_tag).path, torch_threads=args.torch_threads)
    prompts = [Prompt(turns=[MESSAGES[i % len(MESSAGES)]], max_new_tokens=args.max_new_tokens)
               for i in range(args.requests)]
    generate_batch(bot, prompts[: args.concurrency])  # warm-up
    latencies, tokens = [], 0
    start = time.monotonic()
    for i in range(0, len(prompts), args.concurrency):
        batch_start = time.monotonic()
        out = generate_batch(bot, prompts[i: i + args.concurrency])
        latencies += [time.monotonic() - batch_start] * len(out)
        tokens += sum(g.new_tokens for g in out)
    return summary("direct generate()", time.monotonic() - start, latencies, tokens, collections.Counter())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_throughput", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="Registered model whose champion's Bento to serve, e.g. demo-bot.")
    which.add_argument("--bento", help="Bento tag, e.g. castbot-chat:abc123.")
    parser.add_argument("--requests", type=int, default=256, help="Timed requests per phase.")
    parser.add_argument("--concurrency", type=int, default=32, help="Concurrent clients.")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="Reply length limit per request.")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch CPU threads in every phase (0: torch's default; 1 suits a shared machine).")
    parser.add_argument("--phase-timeout", type=float, default=180, help="Seconds before a phase stops early.")
    args = parser.parse_args(argv)

    from castbot.settings import use_project_state

    use_project_state()
    import torch

    bento = args.bento or champion_bento(args.model)
    print(f"bento {bento}; {args.concurrency} clients, {args.requests} timed requests per phase, "
          f"max_new_tokens={args.max_new_tokens}, torch threads={args.torch_threads or torch.get_num_threads()}",
          flush=True)
    rows = [serve_and_measure("served, batched", bento, True, args),
            serve_and_measure("served, unbatched", bento, False, args),
            direct(bento, args)]
    print(f"\n{'':22}{'requests':>9}{'errors':>7}{'req/s':>9}{'gen tok/s':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['name']:22}{r['requests']:>9}{r['errors']:>7}{r['req_s']:>9.1f}{r['tok_s']:>11.0f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}")
    batched, unbatched, limit = rows
    print(f"\nbatched / unbatched: {batched['req_s'] / unbatched['req_s']:.2f}x requests/s, "
          f"{batched['tok_s'] / unbatched['tok_s']:.2f}x tokens/s (goal >= 5)")
    print(f"batched / direct:    {batched['req_s'] / limit['req_s']:.2f}x requests/s, "
          f"{batched['tok_s'] / limit['tok_s']:.2f}x tokens/s (goal >= 0.9)")
    print(f"summary: served/unbatched={batched['req_s'] / unbatched['req_s']:.2f} "
          f"served/engine={batched['req_s'] / limit['req_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
