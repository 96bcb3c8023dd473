"""Serving throughput on the demo's own held-out contexts: 32 concurrent clients against the Bento with each engine,
the same Bento unbatched, and each engine alone with no server on the same chats (the limit).

    python -m bench.serve_throughput --model demo-bot            # the champion's Bento (built if missing)
    python -m bench.serve_throughput --bento castbot-chat:TAG --requests 256
    python -m bench.serve_throughput --model demo-bot --chatlog-overhead    # served with the log on, then off
    python -m bench.serve_throughput --model demo-bot --openai-route        # /chat against /v1/chat/completions
    python -m bench.serve_throughput --model demo-bot --engines             # CPU engines alone (bench/cpu_engines.py)

Phases: served with the continuous engine (clients read /chat/stream, so time to first token is measured), served
with the adaptive engine's static batches and unbatched (clients call /chat: the first text comes with the whole reply),
then in this process the static batched generate() and the continuous engine. Every request uses the service's
default sampling, so reply lengths vary as in use. Only 127.0.0.1 is contacted; each phase stops after
--requests requests or --phase-timeout seconds. Figures: requests/s and generated tokens/s (new tokens incl.
end-of-turn) over the timed phase, after a warm-up; latency per request as a client sees it.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import Timing

DEMO_PROFILE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def held_out_samples(profile: Path = DEMO_PROFILE) -> list[dict]:
    """The profile's test split, built by the flow's own data steps (also_train_on included)."""
    from castbot.config.profile import load_profile
    from flows.train import training_data
    from tasks.data.lineage import report_dir

    return training_data(load_profile(str(profile)), report_dir()).splits["test"]


def held_out_chats(profile: Path = DEMO_PROFILE) -> list[dict]:
    """The profile's test-split contexts as /chat requests: the last context line is the message (a sample with no
    context, an episode's first line, is left out)."""
    return [{"history": [{"speaker": speaker, "text": text}
                         for speaker, text in zip(s["speakers"][:-1], s["context"][:-1])],
             "message": s["context"][-1]} for s in held_out_samples(profile) if s["context"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def champion_bento(model_name: str) -> str:
    """The Bento tag recorded on the champion version; built now if it has none."""
    from mlflow import MlflowClient

    from tasks.release.bento import BENTO_TAG_KEY, build_bento

    version = MlflowClient().get_model_version_by_alias(model_name, "champion")
    return version.tags.get(BENTO_TAG_KEY) or build_bento.fn(model_name, version.version)


def openai_body(body: dict, model: str) -> dict:
    """A /chat request as the same chat through /v1/chat/completions (history speakers as message names)."""
    history = [{"role": "user", "content": turn["text"], **({"name": turn["speaker"]} if turn["speaker"] else {})}
               for turn in body["history"]]
    return {"model": model, "messages": [*history, {"role": "user", "content": body["message"]}]}


async def openai_once(http, body: dict, timing: Timing) -> None:
    """One non-streamed /v1/chat/completions request, timed as the client sees it."""
    start = time.monotonic()
    resp = await http.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        timing.errors[resp.status_code] += 1
        return
    timing.latencies.append(time.monotonic() - start)
    timing.tokens += resp.json()["usage"]["completion_tokens"]


async def chat_once(http, body: dict, stream: bool, timing: Timing) -> None:
    """One /chat (or /chat/stream) request, timed as the client sees it; a body with messages goes to
    /v1/chat/completions."""
    if "messages" in body:
        return await openai_once(http, body, timing)
    start = time.monotonic()
    if not stream:
        resp = await http.post("/chat", json=body)
        if resp.status_code != 200:
            timing.errors[resp.status_code] += 1
            return
        timing.latencies.append(time.monotonic() - start)
        timing.tokens += resp.json()["new_tokens"]
        return
    first, event = None, ""
    async with http.stream("POST", "/chat/stream", json=body) as resp:
        if resp.status_code != 200:
            timing.errors[resp.status_code] += 1
            return
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "done":
                timing.tokens += json.loads(line.removeprefix("data: "))["new_tokens"]
            elif line.startswith("data: ") and event != "start" and first is None:
                first = time.monotonic() - start
            elif not line:
                event = ""
    timing.latencies.append(time.monotonic() - start)
    timing.first_tokens.append(first if first is not None else timing.latencies[-1])


async def drive(url: str, chats: list[dict], requests: int, concurrency: int, stream: bool,
                deadline: float, headers: dict[str, str] | None = None) -> tuple[float, Timing]:
    """`concurrency` clients send chats until `requests` are done; (seconds, timing)."""
    import httpx

    counter, timing = iter(range(requests)), Timing()

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            await chat_once(http, chats[i % len(chats)], stream, timing)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.monotonic() - start, timing


def serve_and_measure(name: str, bento: str, engine: str, batching: bool, chats: list[dict], args,
                      chatlog: bool = True, stream: bool | None = None, extra_env: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> dict:
    """Start `bentoml serve`, warm it up, time args.requests chats from args.concurrency clients, stop it.
    Its conversation log (on unless chatlog is False) is a fresh SQLite file beside its server log; extra_env is
    added to the server's environment, headers to every request."""
    import httpx

    port = free_port()
    stream = engine in ("continuous", "auto") if stream is None else stream
    log = Path(tempfile.mkdtemp(prefix="castbot-bench-")) / "serve.log"
    env = {**os.environ, "CASTBOT_SERVE_ENGINE": engine, "CASTBOT_SERVE_BATCHING": str(batching).lower(),
           "CASTBOT_SERVE_MAX_CONCURRENCY": str(4 * args.concurrency),
           "CASTBOT_SERVE_MAX_BATCH_SIZE": str(args.concurrency), "CASTBOT_SERVE_DTYPE": args.dtype,
           "CASTBOT_SERVE_TORCH_THREADS": str(args.torch_threads),
           "CASTBOT_CHATLOG": "on" if chatlog else "off", "CASTBOT_CHATLOG_URL": f"sqlite:///{log.parent}/chatlog.db",
           **(extra_env or {})}
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
        asyncio.run(drive(url, chats, 2 * args.concurrency, args.concurrency, stream, time.monotonic() + 120, headers))
        seconds, timing = asyncio.run(drive(url, chats, args.requests, args.concurrency, stream,
                                            time.monotonic() + args.phase_timeout, headers))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    if timing.errors:
        print(f"{name}: refused {dict(timing.errors)} (HTTP status: count); server log {log}", flush=True)
    return {**timing.summary(name, seconds), "engine": served_engine(log.parent / "chatlog.db") if chatlog else engine}


def served_engine(chatlog: Path) -> str:
    """The engine that answered, as the conversation log recorded it (auto resolves when the service starts)."""
    from castbot.chatlog.store import ChatLog

    log = ChatLog(f"sqlite:///{chatlog}")
    try:
        return ",".join(sorted(log.turns()["engine"].unique()))
    finally:
        log.close()


def load_bot(bento: str, args):
    import bentoml

    from castbot.model.bot import Bot

    [model_tag] = [m.tag for m in bentoml.get(bento).info.all_models]
    return Bot.load(bentoml.models.get(model_tag).path, torch_threads=args.torch_threads, dtype=args.dtype)


def prompts_of(chats: list[dict], count: int):
    """The chats as the service's prompts, default decoding."""
    from castbot.serve.schemas import ChatRequest, chat_prompt

    return [chat_prompt(ChatRequest(**chats[i % len(chats)])) for i in range(count)]


def direct_static(bot, chats: list[dict], args) -> dict:
    """Batched Bot.generate() in this process on the same chats, in batches of args.concurrency."""
    from castbot.serve.schemas import conversation

    prompts = prompts_of(chats, args.requests)

    def generate_batch(bot, batch):  # default decoding: every prompt has the same settings
        return bot.generate([conversation(p, bot.format.character) for p in batch], **batch[0].decoding())

    generate_batch(bot, prompts[: args.concurrency])  # warm-up
    timing = Timing()
    start = time.monotonic()
    for i in range(0, len(prompts), args.concurrency):
        batch_start = time.monotonic()
        out = generate_batch(bot, prompts[i: i + args.concurrency])
        timing.latencies += [time.monotonic() - batch_start] * len(out)
        timing.tokens += sum(g.new_tokens for g in out)
    return timing.summary("engine: static generate()", time.monotonic() - start)


def direct_continuous(bot, chats: list[dict], args) -> dict:
    """The continuous engine in this process: args.concurrency callers, each sending its next chat at once."""
    from castbot.serve.engines.continuous import ContinuousEngine
    from castbot.serve.schemas import conversation

    engine = ContinuousEngine(bot, args.concurrency)
    conversations = [conversation(p, bot.format.character) for p in prompts_of(chats, args.requests)]

    async def run(count: int) -> tuple[float, Timing]:
        counter, timing = iter(range(count)), Timing()

        async def caller() -> None:
            for i in counter:
                start = time.monotonic()
                reply = await engine.reply(conversations[i])
                timing.latencies.append(time.monotonic() - start)
                timing.tokens += reply.new_tokens

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        return time.monotonic() - start, timing

    try:
        asyncio.run(run(args.concurrency))  # warm-up
        seconds, timing = asyncio.run(run(args.requests))
    finally:
        engine.close()
    return timing.summary("engine: continuous", seconds)


def chatlog_overhead(bento: str, chats: list[dict], args) -> int:
    """Served throughput with the conversation log on against off, alternated twice (the machine drifts)."""
    runs = [serve_and_measure(f"served, log {'on' if on else 'off'}", bento, "continuous", True, chats, args, on)
            for on in (True, False, True, False)]
    print_ratio(runs, "log_on/log_off", 0.97)
    return 0


def print_ratio(runs: list[dict], ratio: str, goal: float) -> None:
    """Print alternated runs (A, B, A, B) and the summary line: mean requests/s of the A runs over the B runs."""
    for r in runs:
        print(f"{r['name']:32}{r['requests']:>6} requests{r['errors']:>4} errors{r['req_s']:>8.2f} req/s"
              f"{r['tok_s']:>8.0f} tok/s  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms")
    first = sum(r["req_s"] for r in runs[0::2]) / 2
    second = sum(r["req_s"] for r in runs[1::2]) / 2
    print(f"summary: {ratio}={first / second:.3f} requests/s (goal >= {goal})")


def openai_route(bento: str, chats: list[dict], args) -> int:
    """Served throughput through /v1/chat/completions against /chat on the same chats, alternated twice."""
    import bentoml

    [model_tag] = [m.tag for m in bentoml.get(bento).info.all_models]
    model = bentoml.models.get(model_tag).info.labels.get("mlflow_model", model_tag.name)
    routes = {"/chat": chats, "/v1/chat/completions": [openai_body(chat, model) for chat in chats]}
    runs = [serve_and_measure(f"served, {route}", bento, "continuous", True, routes[route], args, stream=False)
            for route in ("/v1/chat/completions", "/chat") * 2]
    print_ratio(runs, "openai/chat", 0.95)
    return 0


def engines_alone(bento: str, chats: list[dict], args) -> int:
    """The Bento served with today's default engine, then each candidate CPU engine alone on the same chats."""
    import bentoml

    from bench.cpu_engines import candidates, measure, print_engines, reference_texts
    from castbot.model.bot import Bot
    from castbot.serve.schemas import conversation
    from tasks.release.openvino_export import EXPORTER_ENV

    os.environ.setdefault(EXPORTER_ENV, str(Path(args.openvino_python).absolute()))
    served = serve_and_measure("served, default", bento, "auto", True, chats, args)
    served["name"] = f"served, default ({served['engine']})"
    continuous = serve_and_measure("served, continuous", bento, "continuous", True, chats, args)
    [model_tag] = [m.tag for m in bentoml.get(bento).info.all_models]
    source = Path(bentoml.models.get(model_tag).path)
    bot = Bot.load(str(source), torch_threads=args.torch_threads, dtype=args.dtype)
    conversations = [conversation(p, bot.format.character) for p in prompts_of(chats, args.requests)]
    fp32 = Bot.load(str(source), torch_threads=args.torch_threads, dtype="float32")
    reference = reference_texts(fp32, conversations[:8])
    del fp32
    results = [measure(make, conversations, reference, args) for make in candidates(source, bot, args)]
    print_engines([served, continuous, *results])
    fastest = max(results, key=lambda r: r["tok_s"])
    default = default_alone(results, source, served["engine"])
    print(f"summary: served/fastest_engine={served['tok_s'] / fastest['tok_s']:.2f} "
          f"served/continuous={served['tok_s'] / continuous['tok_s']:.2f} "
          f"one_stream_tok_s={default['one_stream_tok_s']:.1f} (generated tokens/s; served: the Bento's default "
          f"engine, {served['engine']}; fastest alone: {fastest['name']}; one stream: {default['name']})")
    return 0


def default_alone(results: list[dict], folder: Path, engine: str) -> dict:
    """The row of the engine the Bento serves by default, measured alone (OpenVINO: with the Bento's weights)."""
    from castbot.serve.engines.openvino import built_export, read_built_card

    if engine != "openvino":
        return results[0]  # transformers' continuous batching
    weights = read_built_card(folder)["weights"] if built_export(folder) else "fp32"
    return next(r for r in results if r["name"].endswith(f"OpenVINO GenAI {weights}"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_throughput", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="Registered model whose champion's Bento to serve, e.g. demo-bot.")
    which.add_argument("--bento", help="Bento tag, e.g. castbot-chat:abc123.")
    parser.add_argument("--requests", type=int, default=256, help="Timed requests per phase.")
    parser.add_argument("--concurrency", type=int, default=32, help="Concurrent clients.")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch CPU threads in every phase (0: torch's default; 1 suits a shared machine).")
    parser.add_argument("--dtype", default="fast", help="Weights' dtype in every phase (CASTBOT_SERVE_DTYPE).")
    parser.add_argument("--phase-timeout", type=float, default=180, help="Seconds before a phase stops early.")
    parser.add_argument("--openai-route", action="store_true",
                        help="Only the continuous engine served, /v1/chat/completions then /chat, twice (no streams).")
    parser.add_argument("--engines", action="store_true",
                        help="The continuous engine served, then each candidate CPU engine alone "
                        "(bench/cpu_engines.py).")
    parser.add_argument("--openvino-python", default=".venv-openvino/bin/python",
                        help="Python with optimum-intel, for OpenVINO's export (make cpu-engines builds it; "
                        "CASTBOT_OPENVINO_EXPORTER wins).")
    parser.add_argument("--chatlog-overhead", action="store_true",
                        help="Only the continuous engine served, conversation log on / off / on / off.")
    args = parser.parse_args(argv)

    from castbot.common.settings import use_project_state

    use_project_state()
    import torch

    bento = args.bento or champion_bento(args.model)
    chats = held_out_chats()
    print(f"bento {bento}; {len(chats)} held-out demo chats, {args.concurrency} clients, {args.requests} timed "
          f"requests per phase, default sampling, dtype {args.dtype}, "
          f"torch threads={args.torch_threads or torch.get_num_threads()}", flush=True)
    if args.chatlog_overhead:
        return chatlog_overhead(bento, chats, args)
    if args.openai_route:
        return openai_route(bento, chats, args)
    if args.engines:
        return engines_alone(bento, chats, args)
    served = [serve_and_measure("served, continuous", bento, "continuous", True, chats, args),
              serve_and_measure("served, adaptive", bento, "adaptive", True, chats, args)]
    unbatched = serve_and_measure("served, unbatched", bento, "adaptive", False, chats, args)
    bot = load_bot(bento, args)
    engines = [direct_static(bot, chats, args), direct_continuous(bot, chats, args)]
    print(f"\n{'':27}{'requests':>9}{'errors':>7}{'req/s':>8}{'gen tok/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'p50 TTFT ms':>12}")
    for r in [*served, unbatched, *engines]:
        print(f"{r['name']:27}{r['requests']:>9}{r['errors']:>7}{r['req_s']:>8.2f}{r['tok_s']:>10.0f}"
              f"{r['p50_ms']:>8.0f}{r['p99_ms']:>8.0f}{r['ttft_ms']:>12.0f}")
    best, engine = max(served, key=lambda r: r["req_s"]), max(engines, key=lambda r: r["req_s"])
    continuous, adaptive = served
    print(f"\ncontinuous / adaptive:      {continuous['req_s'] / adaptive['req_s']:.2f}x requests/s")
    print(f"{best['name']} / unbatched:  {best['req_s'] / unbatched['req_s']:.2f}x requests/s (goal >= 8)")
    print(f"{best['name']} / {engine['name']}: {best['req_s'] / engine['req_s']:.2f}x requests/s (goal >= 0.9)")
    print(f"summary: served/unbatched={best['req_s'] / unbatched['req_s']:.2f} "
          f"served/engine={best['req_s'] / engine['req_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
