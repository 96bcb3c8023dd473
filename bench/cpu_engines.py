"""Candidate CPU engines alone (no server), on the prompts and sampling of bench.serve_throughput: CTranslate2 with
int8 weights (static batches) and OpenVINO GenAI's continuous batching (int8 and fp32 weights), beside
transformers' continuous batching, which the Bento serves today.

    make cpu-engines                                    # CTranslate2, and .venv-openvino for OpenVINO's export
    python -m bench.serve_throughput --model demo-bot --engines

Each engine starts from the Bento's merged model folder: conversion (timed: part of its start-up, cached per model
afterwards), load, a warm-up, then the timed requests with args.concurrency in flight, then one stream (one request
at a time, greedy). Its greedy replies are compared with transformers' fp32 ones on the same prompts (quantised
weights change text). The OpenVINO rows run castbot's own engine (castbot/serve/engines/openvino.py), as served.
"""

import time
from pathlib import Path

import psutil

from bench.timing import Timing

ONE_STREAM_PROMPTS = 8
ONE_STREAM_TOKENS = 32


def rss_mb() -> float:
    """Resident memory of this process and its children (the OpenVINO engine runs its pipeline in one), MB."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def converted(kind: str, source: Path, convert) -> tuple[Path, float]:
    """The engine's copy of the model folder, made once per model version (cached beside the source's copies
    in the state folder, keyed by the folder's name); (folder, seconds spent converting now)."""
    from castbot.common.settings import STATE_DIR

    target = STATE_DIR / "engines" / f"{source.name}-{kind}"
    if (target / ".complete").exists():
        return target, 0.0
    start = time.monotonic()
    convert(target)
    (target / ".complete").touch()
    return target, time.monotonic() - start


def reference_texts(bot, conversations: list) -> list[str]:
    """transformers' greedy replies in fp32, one at a time: what the engines' greedy replies are compared with."""
    return [bot.generate([turns], temperature=0, no_repeat_ngram_size=0, max_new_tokens=ONE_STREAM_TOKENS)[0].reply
            for turns in conversations]


def sampling(greedy: bool) -> dict:
    """temperature, top_p, top_k: the service's defaults, or None for greedy."""
    from castbot.model.bot import sampling_settings

    return None if greedy else sampling_settings()


class Served:
    """An engine of castbot.serve.engines as the Bento runs it (transformers' continuous batching, OpenVINO GenAI's),
    callers awaiting their replies with args.concurrency in flight."""

    def __init__(self, name: str, engine, convert_s: float = 0.0):
        self.name, self.engine, self.convert_s = name, engine, convert_s

    def generate(self, conversations: list, greedy: bool, max_new_tokens: int) -> list:
        settings = {"temperature": 0} if greedy else {}
        return self.engine.replies(conversations, max_new_tokens=max_new_tokens, no_repeat_ngram_size=0, **settings)

    def run(self, conversations: list, concurrency: int, max_new_tokens: int) -> Timing:
        import asyncio

        counter, timing = iter(conversations), Timing()

        async def caller() -> None:  # streams, as /chat/stream does, so the first piece's time is known
            for turns in counter:
                start, first = time.monotonic(), None
                stream = self.engine.stream(turns, max_new_tokens=max_new_tokens, no_repeat_ngram_size=0)
                async for _ in stream:
                    first = first or time.monotonic() - start
                timing.latencies.append(time.monotonic() - start)
                timing.first_tokens.append(first or timing.latencies[-1])
                timing.tokens += stream.reply.new_tokens

        async def callers() -> None:
            await asyncio.gather(*(caller() for _ in range(concurrency)))

        asyncio.run(callers())
        return timing

    def close(self) -> None:
        self.engine.close()


def transformers_continuous(bot, concurrency: int) -> Served:
    from castbot.serve.engines.continuous import ContinuousEngine

    return Served("transformers continuous", ContinuousEngine(bot, concurrency))


def openvino(bot, weights: str, concurrency: int, threads: int) -> Served:
    """castbot's OpenVINO engine; the export (timed) is cached per model content and weights."""
    from castbot.serve.engines.openvino import OpenVINOEngine
    from tasks.release.openvino_export import export_openvino

    start = time.monotonic()
    folder = export_openvino(bot.folder, weights)
    convert_s = time.monotonic() - start
    return Served(f"OpenVINO GenAI {weights}", OpenVINOEngine(bot, folder, concurrency, threads), convert_s)


class CTranslate2:
    """CTranslate2's Generator (weights int8 or float32): static batches of args.concurrency prompts (a batch
    waits for its longest reply)."""

    def __init__(self, source: Path, bot, threads: int, weights: str):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        def convert(target: Path) -> None:
            TransformersConverter(str(source)).convert(str(target), quantization=weights, force=True)

        self.folder, self.convert_s = converted(f"ct2-{weights}", source, convert)
        self.name, self.bot = f"CTranslate2 {weights}", bot
        self.generator = ctranslate2.Generator(str(self.folder), device="cpu", compute_type=weights,
                                               intra_threads=threads)

    def generate(self, conversations: list, greedy: bool, max_new_tokens: int) -> list:
        from castbot.model.bot import assemble_reply

        sampled = sampling(greedy)
        options = {} if sampled is None else {"sampling_temperature": sampled["temperature"],
                                              "sampling_topp": sampled["top_p"], "sampling_topk": sampled["top_k"]}
        prompts = [self.bot.prompt(turns, max_new_tokens) for turns in conversations]
        results = self.generator.generate_batch(
            [self.bot.tokenizer.convert_ids_to_tokens(ids) for ids in prompts], max_length=max_new_tokens,
            min_length=1, include_prompt_in_result=False, end_token=[self.bot.tokenizer.eos_token_id],
            return_end_token=True, **options)
        return [assemble_reply(self.bot.tokenizer, len(ids), r.sequences_ids[0]) for ids, r in zip(prompts, results)]

    def run(self, conversations: list, concurrency: int, max_new_tokens: int) -> Timing:
        timing = Timing()
        for i in range(0, len(conversations), concurrency):
            start = time.monotonic()
            replies = self.generate(conversations[i: i + concurrency], greedy=False, max_new_tokens=max_new_tokens)
            timing.latencies += [time.monotonic() - start] * len(replies)
            timing.tokens += sum(r.new_tokens for r in replies)
        return timing

    def close(self) -> None:
        del self.generator


def one_stream_tok_s(engine, conversations: list) -> float:
    """Tokens a second for one request at a time (greedy, ONE_STREAM_TOKENS at most each)."""
    tokens, start = 0, time.monotonic()
    for turns in conversations:
        tokens += engine.generate([turns], greedy=True, max_new_tokens=ONE_STREAM_TOKENS)[0].new_tokens
    return tokens / (time.monotonic() - start)


def measure(make, conversations: list, reference: list[str], args) -> dict:
    """Start one engine (conversion, load), warm it up, time it on the conversations, then one stream."""
    from castbot.model.dialogue import DECODING_DEFAULTS

    before, start = rss_mb(), time.monotonic()
    engine = make()
    startup = time.monotonic() - start
    memory = rss_mb() - before
    max_new = DECODING_DEFAULTS["max_new_tokens"]
    try:
        engine.run(conversations[: args.concurrency], args.concurrency, max_new)  # warm-up
        start = time.monotonic()
        timing = engine.run(conversations, args.concurrency, max_new)
        summary = timing.summary(f"alone: {engine.name}", time.monotonic() - start)
        few = conversations[:ONE_STREAM_PROMPTS]
        texts = [r.reply for r in engine.generate(few, greedy=True, max_new_tokens=ONE_STREAM_TOKENS)]
        summary.update(one_stream_tok_s=one_stream_tok_s(engine, few), startup_s=startup, convert_s=engine.convert_s,
                       memory_mb=memory, same_greedy=f"{sum(a == b for a, b in zip(texts, reference))}/{len(few)}",
                       replies=texts)
    finally:
        engine.close()
    return summary


def candidates(source: Path, bot, args) -> list:
    """Constructors of the engines to measure: transformers' continuous batching, and those installed here (a
    missing one is named with how to install it)."""
    threads, concurrency = args.torch_threads, args.concurrency
    found = [lambda: transformers_continuous(bot, concurrency)]
    try:
        import ctranslate2  # noqa: F401

        found += [lambda w=w: CTranslate2(source, bot, threads, w) for w in ("int8", "float32")]
    except ImportError:
        print("CTranslate2 not measured (not installed): make cpu-engines", flush=True)
    return found + [lambda w=w: openvino(bot, w, concurrency, threads) for w in ("int8", "fp32")]


def print_engines(results: list[dict]) -> None:
    print(f"\n{'':34}{'req/s':>7}{'gen tok/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'TTFT ms':>8}{'1-stream':>9}"
          f"{'start s':>8}{'conv s':>7}{'MB':>6}{'=greedy':>8}")
    nan = float("nan")
    for r in results:
        print(f"{r['name']:34}{r['req_s']:>7.2f}{r['tok_s']:>10.0f}{r['p50_ms']:>8.0f}{r['p99_ms']:>8.0f}"
              f"{r['ttft_ms']:>8.0f}{r.get('one_stream_tok_s', nan):>9.1f}{r.get('startup_s', nan):>8.1f}"
              f"{r.get('convert_s', nan):>7.1f}{r.get('memory_mb', nan):>6.0f}{r.get('same_greedy', '-'):>8}")
    for r in results:
        for reply in r.get("replies", [])[:3]:
            print(f"  {r['name']}: {reply!r}")
