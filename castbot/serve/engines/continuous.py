"""Continuous batching: requests join and leave the running batch at every decoding step.

transformers' ContinuousBatchingManager (paged KV cache, one background thread) does the scheduling; this module
only turns a Bot's conversations into its requests and its outputs into Replies, awaitable or streamed.

    engine = ContinuousEngine(bot)
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)

Per-request decoding: temperature, top_p, top_k and max_new_tokens hold per request (transformers' per-request
logits processors). Greedy (castbot.model.bot.sampling_settings gives None) is sampling from the top 1 token, which
equals generate()'s argmax. transformers 5's continuous batching drops the logits processors that read a request's
token history: no_repeat_ngram_size is not applied here (the continuous engine serves without it), and
min_new_tokens=1 (never an empty reply) is put back by compat.never_empty_processor.
"""

import asyncio
import math
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from castbot.model.bot import Bot, sampling_settings
from castbot.model.dialogue import DECODING_DEFAULTS
from castbot.serve.engines.base import BatchingEngine, EngineError
from castbot.serve.engines.compat import add_first_processor, decoding_steps, never_empty_processor, running_requests

PAGE_SIZE = 64  # tokens per KV-cache page on CPU; on a GPU transformers sizes the cache from free memory


def request_settings(vocab_size: int, **decoding) -> dict:
    """Per-request logits-processor arguments for transformers' continuous batching."""
    sampled = sampling_settings(**decoding)
    if sampled is None:  # greedy: sampling from the single likeliest token
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {**sampled, "top_k": sampled["top_k"] or vocab_size}  # top_k 0 means all tokens, as in generate()


class ContinuousEngine(BatchingEngine):
    """A Bot behind transformers' continuous batching; up to max_batch_size requests decode together."""

    def __init__(self, bot: Bot, max_batch_size: int = 32, max_new_tokens: int = 128):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.bot, self.max_batch_size = bot, max_batch_size
        tokenizer = bot.tokenizer
        # do_sample and non-neutral defaults make transformers create the per-request temperature/top-k/top-p
        # processors; each request then carries its own values
        generation = GenerationConfig(
            do_sample=True, max_new_tokens=DECODING_DEFAULTS["max_new_tokens"],
            temperature=DECODING_DEFAULTS["temperature"], top_p=DECODING_DEFAULTS["top_p"],
            top_k=DECODING_DEFAULTS["top_k"], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        sizes = {}
        if bot.device.type == "cpu":  # transformers sizes the cache from GPU memory; on CPU say what a full batch needs
            tokens_per_request = bot.max_length + max_new_tokens
            sizes = {"page_size": PAGE_SIZE, "num_blocks": math.ceil(max_batch_size * tokens_per_request / PAGE_SIZE),
                     "max_batch_tokens": max_batch_size * PAGE_SIZE}
        config = ContinuousBatchingConfig(per_request_processors=True, max_requests_per_batch=max_batch_size, **sizes)
        # outside torch.inference_mode: the manager's thread updates its cache tensors in place
        try:
            self.manager = bot.model.init_continuous_batching(generation_config=generation,
                                                              continuous_batching_config=config)
        except (ValueError, NotImplementedError, AttributeError) as exc:  # e.g. an attention it cannot page
            raise EngineError(f"transformers' continuous batching cannot run this model ({exc}); serve it with "
                              "CASTBOT_SERVE_ENGINE=adaptive") from exc
        add_first_processor(self.manager, never_empty_processor(tokenizer.eos_token_id))
        self.manager.start()
        # outputs are routed here, not through register_result_handler: transformers drops a cancelled request
        # without a last output, so a per-request handler would stay registered, bound to its event loop, forever
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock, self._closed = threading.Lock(), threading.Event()
        self._router = threading.Thread(target=self._route, name="castbot-engine-outputs", daemon=True)
        self._router.start()

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch: Callable[[int], None]) -> "ContinuousEngine":
        """As the service builds it (no static batches: on_batch is never called)."""
        return cls(bot, limits.max_batch_size, limits.max_new_tokens)

    def _route(self) -> None:
        """Hand each output to the event loop of the request waiting for it; drop those nobody waits for."""
        while not self._closed.is_set():
            output = self.manager.get_result(timeout=0.1)
            if output is None:
                if not self.manager.is_running():
                    self._closed.wait(0.1)
                continue
            with self._lock:
                target = self._waiting.get(output.request_id)
            if target is None:
                continue
            loop, outputs = target
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the waiting loop closed meanwhile
                pass

    def running(self) -> int:
        return running_requests(self.manager)

    def steps(self) -> int:
        return decoding_steps(self.manager)

    def ready(self) -> bool:
        """The manager's decoding thread and this engine's output router are both alive."""
        return not self._closed.is_set() and self.manager.is_running() and self._router.is_alive()

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)
        self._closed.set()

    async def _generated(self, prompt: list[int], streaming: bool, **decoding) -> AsyncIterator[list[int]]:
        """The reply's token ids as the manager's thread delivers them: after every token when streaming, else once
        at the end. Leaving early (a client that went away) cancels the request."""
        max_new = decoding.get("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = uuid.uuid4().hex
        with self._lock:  # before add_request, or an early output finds nobody waiting
            self._waiting[request_id] = (asyncio.get_running_loop(), outputs)
        finished = False
        try:
            added = self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new,
                                             streaming=streaming,
                                             **request_settings(self.bot.model.config.vocab_size, **decoding))
            if added is None:
                raise EngineError("the continuous-batching thread is not accepting requests (stopped or failed)")
            while not finished:
                output = await outputs.get()
                if output.error:
                    raise EngineError(f"generation failed: {output.error}")
                finished = output.is_finished()
                yield list(output.generated_tokens)
        finally:
            with self._lock:
                del self._waiting[request_id]
            if not finished:
                self.manager.cancel_request(request_id)
