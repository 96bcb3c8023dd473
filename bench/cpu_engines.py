"""Candidate CPU engines alone (no server), on the prompts and sampling of bench.serve_throughput: CTranslate2 with
int8 weights (static batches) and OpenVINO GenAI's continuous batching (int8 and fp32 weights), beside
transformers' continuous batching, which the Bento serves today.

    make cpu-engines                                    # the engines, and .venv-openvino for OpenVINO's export
    python -m bench.serve_throughput --model demo-bot --engines

Each engine starts from the Bento's merged model folder: conversion (timed: part of its start-up), load, a warm-up,
then the timed requests with args.concurrency in flight, then one stream (one request at a time, greedy). Its
replies are compared with transformers' fp32 greedy replies on the same prompts (quantised weights change text).
OpenVINO's exporter (optimum-intel) needs transformers < 5.6, so it runs in its own virtual environment
(--openvino-python); the pipeline itself needs only the `openvino-genai` wheel.
"""

import subprocess
import time
from pathlib import Path

import psutil

from bench.serve_throughput import Timing

ONE_STREAM_PROMPTS = 8
ONE_STREAM_TOKENS = 32


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def converted(kind: str, source: Path, convert) -> tuple[Path, float]:
    """The engine's copy of the model folder, made once per model version (cached beside the source's copies
    in the state folder, keyed by the folder's name); (folder, seconds spent converting now)."""
    from castbot.settings import STATE_DIR

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
    from castbot.bot import sampling_settings

    return None if greedy else sampling_settings()


class Transformers:
    """transformers' continuous batching as the Bento serves it (castbot.engines.continuous), callers awaiting
    their replies with args.concurrency in flight."""

    def __init__(self, bot, concurrency: int):
        from castbot.engines.continuous import ContinuousEngine

        self.name, self.convert_s = "transformers continuous", 0.0
        self.engine = ContinuousEngine(bot, concurrency)

    def generate(self, conversations: list, greedy: bool, max_new_tokens: int) -> list:
        settings = {"temperature": 0} if greedy else {}
        return self.engine.replies(conversations, max_new_tokens=max_new_tokens, **settings)

    def run(self, conversations: list, concurrency: int, max_new_tokens: int) -> Timing:
        import asyncio

        counter, timing = iter(conversations), Timing()

        async def caller() -> None:
            for turns in counter:
                start = time.monotonic()
                reply = await self.engine.reply(turns, max_new_tokens=max_new_tokens)
                timing.latencies.append(time.monotonic() - start)
                timing.tokens += reply.new_tokens

        async def callers() -> None:
            await asyncio.gather(*(caller() for _ in range(concurrency)))

        asyncio.run(callers())
        return timing

    def close(self) -> None:
        self.engine.close()


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
        from castbot.bot import assemble_reply

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


class OpenVINO:
    """OpenVINO GenAI's ContinuousBatchingPipeline (paged attention): requests join and leave the running batch
    at every step; this loop keeps args.concurrency in flight, as a server's engine thread would."""

    def __init__(self, source: Path, bot, threads: int, weights: str, exporter: Path, concurrency: int):
        import openvino_genai

        def export(target: Path) -> None:
            done = subprocess.run([str(exporter), "-m", "optimum.commands.optimum_cli", "export", "openvino",
                                   "--model", str(source), "--task", "text-generation-with-past",
                                   "--weight-format", weights, str(target)], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"OpenVINO export failed:\n{done.stderr[-2000:]}")

        self.folder, self.convert_s = converted(f"openvino-{weights}", source, export)
        self.name, self.bot, self.genai = f"OpenVINO GenAI {weights}", bot, openvino_genai
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs, scheduler.cache_size = concurrency, 1  # GB of KV cache
        properties = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.pipe = openvino_genai.ContinuousBatchingPipeline(str(self.folder), scheduler, "CPU", properties)
        self.next_id = 0

    def config(self, greedy: bool, max_new_tokens: int):
        config = self.genai.GenerationConfig()
        config.max_new_tokens, config.min_new_tokens = max_new_tokens, 1
        config.stop_token_ids = {self.bot.tokenizer.eos_token_id}
        config.apply_chat_template = False
        sampled = sampling(greedy)
        if sampled is not None:
            config.do_sample = True
            config.temperature, config.top_p, config.top_k = sampled["temperature"], sampled["top_p"], sampled["top_k"]
        return config

    def add(self, ids: list[int], config):
        import numpy as np
        import openvino

        self.next_id += 1
        return self.pipe.add_request(self.next_id, openvino.Tensor(np.array([ids], dtype=np.int64)), config)

    def drive(self, conversations: list, concurrency: int, config, max_new_tokens: int, timing: Timing) -> list:
        """Run every conversation, `concurrency` at a time; their Replies, in order."""
        from castbot.bot import assemble_reply

        running_status = self.genai.py_openvino_genai.GenerationStatus.RUNNING
        prompts = [self.bot.prompt(turns, max_new_tokens) for turns in conversations]
        waiting, running, rows = list(range(len(prompts))), {}, [[] for _ in prompts]
        while waiting or running:
            while waiting and len(running) < concurrency:
                index = waiting.pop(0)
                running[index] = [self.add(prompts[index], config), time.monotonic(), None]
            self.pipe.step()
            for index, entry in list(running.items()):
                handle, start, first = entry
                if handle.can_read():
                    for output in handle.read().values():
                        rows[index] += output.generated_ids
                    entry[2] = first or time.monotonic() - start
                if handle.get_status() != running_status and not handle.can_read():
                    timing.latencies.append(time.monotonic() - start)
                    timing.first_tokens.append(entry[2] or timing.latencies[-1])
                    timing.tokens += len(rows[index])
                    del running[index]
        return [assemble_reply(self.bot.tokenizer, len(ids), row) for ids, row in zip(prompts, rows)]

    def generate(self, conversations: list, greedy: bool, max_new_tokens: int) -> list:
        config = self.config(greedy, max_new_tokens)
        return self.drive(conversations, len(conversations), config, max_new_tokens, Timing())

    def run(self, conversations: list, concurrency: int, max_new_tokens: int) -> Timing:
        timing = Timing()
        self.drive(conversations, concurrency, self.config(False, max_new_tokens), max_new_tokens, timing)
        return timing

    def close(self) -> None:
        del self.pipe


def one_stream_tok_s(engine, conversations: list) -> float:
    """Tokens a second for one request at a time (greedy, ONE_STREAM_TOKENS at most each)."""
    tokens, start = 0, time.monotonic()
    for turns in conversations:
        tokens += engine.generate([turns], greedy=True, max_new_tokens=ONE_STREAM_TOKENS)[0].new_tokens
    return tokens / (time.monotonic() - start)


def measure(make, conversations: list, reference: list[str], args) -> dict:
    """Start one engine (conversion, load), warm it up, time it on the conversations, then one stream."""
    from castbot.dialogue import DECODING_DEFAULTS

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
    found = [lambda: Transformers(bot, concurrency)]
    try:
        import ctranslate2  # noqa: F401

        found += [lambda w=w: CTranslate2(source, bot, threads, w) for w in ("int8", "float32")]
    except ImportError:
        print("CTranslate2 not measured (not installed): make cpu-engines", flush=True)
    exporter = Path(args.openvino_python)
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        print("OpenVINO GenAI not measured (not installed): make cpu-engines", flush=True)
        return found
    if not exporter.exists():
        print(f"OpenVINO GenAI not measured: no exporter at {exporter} (make cpu-engines)", flush=True)
        return found
    return found + [lambda w=w: OpenVINO(source, bot, threads, w, exporter, concurrency) for w in ("int8", "fp32")]


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
