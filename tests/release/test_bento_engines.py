"""The serving engines on tiny models of both families: adaptive batching (BentoML's dispatcher), continuous
batching (transformers') and OpenVINO GenAI's. Batched greedy replies equal the argmax continuations of their
prompts, streams join to their replies and a client that leaves cancels its request, a dead engine says so."""

import math

import pytest

from castbot.model.bot import Bot
from tests.release.conftest import CHATS, GREEDY, argmax_reply

pytestmark = pytest.mark.unit


WARM_UP = 12  # BentoML 1.4's CorkDispatcher dispatches its first 11 calls one by one while it measures


@pytest.fixture
def adaptive(bot):
    """An adaptive engine whose batch hook holds its first batch until the test opens `gate`."""
    import threading

    from castbot.serve.engines.adaptive import AdaptiveEngine

    gate, sizes = threading.Event(), []

    def on_batch(size: int) -> None:
        sizes.append(size)
        gate.wait(30)

    engine = AdaptiveEngine(bot, max_batch_size=8, on_batch=on_batch)
    engine.gate, engine.sizes = gate, sizes
    yield engine
    gate.set()
    engine.close()


def test_adaptive_requests_queued_together_run_in_one_batch_and_get_the_replies_they_get_alone(bot, adaptive):
    import asyncio

    chats = CHATS * 3 + [CHATS[0]]
    settings = [GREEDY] * 6 + [{**GREEDY, "max_new_tokens": 3}]  # other settings: a generate() call of its own

    async def together():
        adaptive.gate.set()
        for _ in range(WARM_UP):  # BentoML's dispatcher first runs single requests to learn a batch's cost
            await adaptive.reply(CHATS[0], **GREEDY)
        adaptive.sizes.clear()
        adaptive.gate.clear()
        replies = [asyncio.ensure_future(adaptive.reply(chat, **decoding)) for chat, decoding in zip(chats, settings)]
        await asyncio.sleep(0.2)  # every request is queued (or held in the first batch) before any batch runs
        adaptive.gate.set()
        return await asyncio.gather(*replies)

    replies = asyncio.run(together())
    assert replies == [bot.generate([chat], **decoding)[0] for chat, decoding in zip(chats, settings)]
    assert sum(adaptive.sizes) == len(chats) and max(adaptive.sizes) > 1, adaptive.sizes
    assert adaptive.running() == 0 and adaptive.steps() == 0


def needs_text(bot: Bot) -> None:
    if bot.format.style == "chat":
        pytest.skip("the tiny chat-template model greedily replies with newlines only: no piece to stream or leave at")


async def collect(stream, keep: int | None = None) -> list[str]:
    """A Stream's pieces; stop (close it) after `keep` pieces, as a client that leaves."""
    import contextlib

    pieces = []
    async with contextlib.aclosing(stream):
        async for piece in stream:
            pieces.append(piece)
            if keep is not None and len(pieces) == keep:
                break
    return pieces


def test_an_adaptive_stream_joins_to_the_reply_generate_gives_and_leaving_early_cancels_it(bot, adaptive):
    import asyncio

    needs_text(bot)
    adaptive.gate.set()
    decoding = {**GREEDY, "max_new_tokens": 16}
    stream = adaptive.stream(CHATS[1], **decoding)
    pieces = asyncio.run(collect(stream))
    assert stream.reply == bot.generate([CHATS[1]], **decoding)[0]
    assert "".join(pieces).strip() == stream.reply.reply and len(pieces) >= 1
    assert stream.reply.finish_reason in ("stop", "length")
    left = adaptive.stream(CHATS[1], **{**GREEDY, "max_new_tokens": 16})
    asyncio.run(collect(left, keep=1))
    assert left.reply.finish_reason == "cancelled" and left.reply.new_tokens >= 1


def test_a_failed_generation_ends_the_stream_with_an_error(adaptive):
    import asyncio

    from castbot.serve.engines import EngineError

    with pytest.raises(EngineError, match="generation failed"):
        asyncio.run(collect(adaptive.stream(CHATS[0], max_new_tokens=0)))  # generate() refuses max_new_tokens=0


@pytest.fixture(params=["continuous", "openvino"])
def engine(request, bot):
    """The continuous-batching engines: transformers' and OpenVINO GenAI's (the tiny model exported in fp32 by
    .venv-openvino's optimum-intel, once per model)."""
    from castbot.serve.engines.continuous import ContinuousEngine
    from castbot.serve.engines.openvino import OpenVINOEngine
    from tasks.release.openvino_export import export_openvino

    if request.param == "continuous":
        engine = ContinuousEngine(bot, max_batch_size=4, max_new_tokens=16)
    else:
        engine = OpenVINOEngine(bot, export_openvino(bot.folder, "fp32"), max_batch_size=4)
    yield engine
    engine.close()  # the continuous engine gives the model back its own attention implementation


def continuous_greedy(bot: Bot, chat, max_new: int) -> list[int]:
    return argmax_reply(bot, bot.prompt(chat, max_new), max_new)


def test_batched_greedy_replies_are_the_argmax_continuations_of_their_prompts(bot, engine):
    replies = engine.replies(CHATS, **GREEDY)  # decoded together, prompts of different lengths
    for chat, reply in zip(CHATS, replies):
        expected = continuous_greedy(bot, chat, GREEDY["max_new_tokens"])
        assert reply.new_tokens == len(expected)
        assert reply.prompt_tokens == len(bot.prompt(chat, GREEDY["max_new_tokens"]))
        text_ids = expected[:-1] if expected[-1] == bot.tokenizer.eos_token_id else expected
        assert reply.reply == bot.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        assert reply.finish_reason == ("stop" if expected[-1] == bot.tokenizer.eos_token_id else "length")
    assert engine.steps() >= max(r.new_tokens for r in replies)  # decoding steps, counted by the engine
    before = engine.steps()
    replies = engine.replies(CHATS * 4, **GREEDY)  # 8 requests at once share the decoding steps
    assert engine.steps() - before < sum(r.new_tokens for r in replies) / 2


def test_batched_requests_keep_their_own_decoding_settings(bot, engine):
    import asyncio

    async def together():
        return await asyncio.gather(engine.reply(CHATS[0], **{**GREEDY, "max_new_tokens": 3}),
                                    engine.reply(CHATS[1], temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=16),
                                    engine.reply(CHATS[1], **GREEDY))

    short, sampled, greedy = asyncio.run(together())
    assert short.new_tokens <= 3
    assert short.new_tokens == len(continuous_greedy(bot, CHATS[0], 12)[:3])
    assert greedy.reply == engine.replies([CHATS[1]], **GREEDY)[0].reply  # a sampled neighbour changes nothing
    assert greedy.new_tokens == len(continuous_greedy(bot, CHATS[1], GREEDY["max_new_tokens"]))
    assert sampled.new_tokens <= 16 and sampled.prompt_tokens == greedy.prompt_tokens


def test_a_batched_stream_joins_to_its_reply_and_leaving_early_cancels_it(bot, engine):
    import asyncio

    needs_text(bot)
    stream = engine.stream(CHATS[1], **{**GREEDY, "max_new_tokens": 16})
    pieces = asyncio.run(collect(stream))
    assert "".join(pieces).strip() == stream.reply.reply and stream.reply.finish_reason in ("stop", "length")
    left = engine.stream(CHATS[1], **{**GREEDY, "max_new_tokens": 16})
    asyncio.run(collect(left, keep=1))  # a client that leaves after the first piece
    assert left.reply.finish_reason == "cancelled" and left.reply.new_tokens >= 1
    [after] = engine.replies([CHATS[1]], **GREEDY)  # the engine goes on serving
    assert after.new_tokens == len(continuous_greedy(bot, CHATS[1], GREEDY["max_new_tokens"]))
    assert engine.running() == 0  # the cancelled request left the batch


@pytest.mark.parametrize("kind", ["continuous", "adaptive", "openvino"])
def test_an_engine_whose_threads_stopped_is_not_ready_and_refuses_work(bot, kind, tmp_path):
    """The service's /readyz answers from engine.ready(): a dead engine must say so, and fail requests, not hang."""
    import asyncio
    import shutil

    from castbot.serve.engines import EngineError, make_engine
    from castbot.serve.schemas import ServeLimits
    from tasks.release.openvino_export import export_for_cpu

    if kind == "openvino":  # the engine serves the export a Bento build places in the model folder
        shutil.copytree(bot.folder, tmp_path / "model")
        export_for_cpu(tmp_path / "model", "fp32", None, 0.01)
        bot = Bot.load(str(tmp_path / "model"), fmt=bot.format, max_length=96, weights=False)
    engine = make_engine(kind, bot, ServeLimits(max_batch_size=4, max_new_tokens=16))
    try:
        assert engine.ready()
        if kind == "continuous":
            engine.manager.stop(block=True, timeout=30)  # its decoding thread ends, as after a crash
        else:
            engine.close()
        assert not engine.ready()
        with pytest.raises(EngineError, match="not accepting requests|not running"):
            asyncio.run(asyncio.wait_for(engine.reply(CHATS[0], **GREEDY), 30))
    finally:
        engine.close()


def test_transformers_still_has_the_continuous_batching_internals_the_engine_touches():
    """When this fails, transformers changed what castbot/serve/engines/compat.py relies on: fix the function named."""
    import inspect

    from transformers.generation.continuous_batching import continuous_api, input_outputs, scheduler
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    # never_empty_processor: still needed (min_new_tokens dropped from CB), and the processor protocol it implements
    assert MinNewTokensLengthLogitsProcessor.supports_continuous_batching is False
    assert {"fill_defaults", "prepare_tensor_args", "__call__"} <= set(vars(ContinuousBatchingLogitsProcessor))
    # add_first_processor: the list, the argument-tensor count read at allocation, the processing switch
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
    assert processors.logits_processor == [] and processors.tensors_required == 0
    assert processors.do_processing is False
    assert "logit_processor.tensors_required" in inspect.getsource(input_outputs)
    manager = inspect.getsource(continuous_api.ContinuousBatchingManager)
    assert "self.logit_processor = " in manager
    # running_requests and decoding_steps
    assert "self.batch_processor = " in manager and "self.current_batch += 1" in manager
    assert "self.active_requests: dict" in inspect.getsource(scheduler)


BF16_LOGIT_TOLERANCE = 0.02  # bf16 moves these models' logits by under 0.003; 1 token in 300 is within 0.05 of the top


def test_the_continuous_engine_serves_a_bf16_model_that_picks_the_fp32_models_tokens(bot):
    """Every token the engine picks greedily from a bf16 copy of the model is the fp32 model's likeliest next token,
    or within bf16 rounding of it, so its replies are the fp32 argmax replies up to the first near-tie."""
    import asyncio
    import copy

    import torch

    from castbot.model.bot import assemble_reply
    from castbot.serve.engines.continuous import ContinuousEngine

    half = Bot(bot.tokenizer, copy.deepcopy(bot.model).to(torch.bfloat16), bot.format, bot.max_length)
    engine = ContinuousEngine(half, max_batch_size=4, max_new_tokens=16)
    prompts = [bot.prompt(chat, GREEDY["max_new_tokens"]) for chat in CHATS]

    async def generated_ids(prompt: list[int]) -> list[int]:  # the ids reply() decodes (BatchingEngine's protocol)
        return [ids async for ids in engine._generated(prompt, False, **GREEDY)][-1]

    try:
        replies = engine.replies(CHATS, **GREEDY)
        generated = [asyncio.run(generated_ids(prompt)) for prompt in prompts]
    finally:
        engine.close()
    for prompt, reply, ids in zip(prompts, replies, generated):
        assert assemble_reply(bot.tokenizer, len(prompt), ids) == reply  # greedy: the same ids both times
        assert reply.prompt_tokens == len(prompt) and 1 <= reply.new_tokens <= GREEDY["max_new_tokens"]
        ids = ids[:reply.new_tokens]
        with torch.inference_mode():  # (new, vocab): the fp32 model's logits for each picked token, teacher-forced
            logits = bot.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
            logits[0, bot.tokenizer.eos_token_id] = -math.inf  # min_new_tokens=1: a reply is never empty
        behind = logits.max(-1).values - logits[torch.arange(len(ids)), ids]
        assert (behind <= BF16_LOGIT_TOLERANCE).all(), f"fp32 logits behind the top, per picked token: {behind}"
        tied = (logits.topk(2).values.diff(dim=-1)[:, 0].abs() <= BF16_LOGIT_TOLERANCE).nonzero()
        first_tie = int(tied[0]) if len(tied) else len(ids)
        assert ids[:first_tie] == argmax_reply(bot, prompt, GREEDY["max_new_tokens"])[:first_tie]
