"""What the chat service accepts and how it turns chats into batched generation.

The service (service.py), the benchmark's no-server baseline and the tests all use these functions,
so a chat is built and decoded the same way everywhere. Limits come from CASTBOT_SERVE_* variables.
"""

import os
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from castbot.dialogue import DECODING_DEFAULTS, decode_reply, prompt_ids

ENV_PREFIX = "CASTBOT_SERVE_"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServeLimits(Strict):
    """Request limits and capacity of one service process; each field reads CASTBOT_SERVE_<NAME>."""

    max_message_chars: int = Field(1000, ge=1, description="Longest accepted message, in characters.")
    max_turn_chars: int = Field(1000, ge=1, description="Longest accepted history turn, in characters.")
    max_history_turns: int = Field(50, ge=0, description="Most history turns a chat request may send.")
    max_new_tokens: int = Field(128, ge=1, description="Largest max_new_tokens a request may ask for.")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one /generate request.")
    max_request_bytes: int = Field(65536, ge=1024, description="Largest request body, in bytes (413 beyond).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight beyond which the service answers 503.")
    timeout_s: int = Field(60, ge=1, description="A request still running after this many seconds gets a 504.")
    batching: bool = Field(True, description="Adaptive batching of /generate (false: one prompt list at a time).")
    max_batch_size: int = Field(32, ge=2, description="Most prompts the model runs in one batch.")
    max_latency_ms: int = Field(5000, ge=10, description="Latency budget of a batched call; beyond it a 503.")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default, one per core); "
                               "1 is often faster on a machine shared with other jobs.")


def load_limits(environ: dict[str, str] | None = None) -> ServeLimits:
    """ServeLimits from CASTBOT_SERVE_* variables, e.g. CASTBOT_SERVE_MAX_CONCURRENCY=32."""
    environ = os.environ if environ is None else environ
    raw = {name: environ[ENV_PREFIX + name.upper()] for name in ServeLimits.model_fields
           if ENV_PREFIX + name.upper() in environ}
    return ServeLimits.model_validate(raw)


LIMITS = load_limits()  # request models below take their bounds from it


def _text(max_chars: int) -> type[str]:
    return Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=max_chars)]


class Decoding(Strict):
    """Sampling settings; defaults are castbot.dialogue.DECODING_DEFAULTS, shared with evaluation."""

    max_new_tokens: int = Field(min(DECODING_DEFAULTS["max_new_tokens"], LIMITS.max_new_tokens), ge=1,
                                le=LIMITS.max_new_tokens, description="Most tokens in the reply.")
    temperature: float = Field(DECODING_DEFAULTS["temperature"], ge=0, le=2,
                               description="Sampling temperature; 0 decodes greedily.")
    top_p: float = Field(DECODING_DEFAULTS["top_p"], gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(DECODING_DEFAULTS["top_k"], ge=0, le=1000, description="Sample from the k likeliest; 0: all.")
    no_repeat_ngram_size: int = Field(DECODING_DEFAULTS["no_repeat_ngram_size"], ge=0, le=10,
                                      description="Never repeat an n-gram of this size; 0: off.")

    def settings(self) -> tuple:
        """A hashable key: prompts with equal settings share one generate() call."""
        return tuple(getattr(self, name) for name in Decoding.model_fields)


class Prompt(Decoding):
    turns: list[_text(max(LIMITS.max_turn_chars, LIMITS.max_message_chars))] = Field(
        ..., min_length=1, max_length=LIMITS.max_history_turns + 1,
        description="The conversation so far, oldest first; the reply continues it.")


class GenerateRequest(Strict):
    prompts: list[Prompt] = Field(..., min_length=1, max_length=LIMITS.max_prompts,
                                  description="Prompts to continue; each may carry its own decoding settings.")


class Generation(BaseModel):
    reply: str = Field(..., description="The generated turn, up to the first end-of-turn token.")
    prompt_tokens: int = Field(..., description="Tokens of the prompt after truncating the oldest turns.")
    new_tokens: int = Field(..., description="Tokens generated, including the end-of-turn token.")


class Turn(Strict):
    speaker: str = Field("", max_length=64, description="Who said it (informational: the format has no names).")
    text: _text(LIMITS.max_turn_chars) = Field(..., description="What was said.")


class ChatRequest(Decoding):
    history: list[Turn] = Field(default_factory=list, max_length=LIMITS.max_history_turns,
                                description="Earlier turns, oldest first; empty for a single-turn chat.")
    message: _text(LIMITS.max_message_chars) = Field(..., description="The user's new message.")


class ChatReply(Generation):
    model_name: str = Field(..., description="Registered MLflow model that answered.")
    model_version: str = Field(..., description="Its MLflow model version.")
    character: str = Field(..., description="The character the model speaks as.")


def chat_prompt(request: ChatRequest) -> Prompt:
    """The /generate prompt for a chat: history texts then the message, with the request's decoding."""
    turns = [turn.text for turn in request.history] + [request.message]
    return Prompt(turns=turns, **request.model_dump(include=set(Decoding.model_fields)))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad token rows to one width: (input_ids, attention_mask), both (batch, width)."""
    width = max(len(row) for row in rows)
    return ([[pad_id] * (width - len(row)) + row for row in rows],
            [[0] * (width - len(row)) + [1] * len(row) for row in rows])


def load_chat_model(path: str, torch_threads: int = 0):
    """(tokenizer, model, device) from a save_pretrained folder: CUDA in bf16/fp16 when present, else CPU fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch_threads:
        torch.set_num_threads(torch_threads)

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, dtype = "cpu", torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return tokenizer, model, device


def position_limit(model) -> int:
    """Longest sequence (prompt + reply) the model's position table holds."""
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def generate_batch(tokenizer, model, prompts: list[Prompt]) -> list[Generation]:
    """Replies to prompts that share decoding settings, in one left-padded generate() call."""
    import torch

    decoding = prompts[0]
    budget = position_limit(model) - decoding.max_new_tokens  # prompt + reply must fit the position table
    ids, mask = left_pad([prompt_ids(tokenizer, p.turns, budget) for p in prompts], tokenizer.pad_token_id)
    device = model.device
    sampling = ({"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p,
                 "top_k": decoding.top_k} if decoding.temperature > 0 else {"do_sample": False})
    with torch.inference_mode():
        out = model.generate(  # (batch, width) -> (batch, width + new)
            input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
            max_new_tokens=decoding.max_new_tokens, min_new_tokens=1,  # never an empty turn
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
    results = []
    for row, row_mask in zip(out[:, len(ids[0]):].tolist(), mask):
        new = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        results.append(Generation(reply=decode_reply(tokenizer, new), prompt_tokens=sum(row_mask),
                                  new_tokens=len(new)))
    return results


def group_by_settings(prompts: list[Prompt]) -> dict[tuple, list[int]]:
    """Indices of prompts per distinct decoding settings, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.settings(), []).append(i)
    return groups
