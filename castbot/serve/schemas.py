"""What the chat service accepts and how it turns chats into batched generation.

The service (service.py), the benchmark's no-server baseline and the tests all use these functions,
so a chat is built and decoded the same way everywhere. Limits come from CASTBOT_SERVE_* variables.
"""

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from castbot.config.base import Strict
from castbot.model.dialogue import DECODING_DEFAULTS
from castbot.serve.engines import ENGINES

# JSON requests: no extra keys, and no type coercion ("5" is not an integer, false is not 0), as the spec says
STRICT_JSON = ConfigDict(extra="forbid", strict=True)

ENV_PREFIX = "CASTBOT_SERVE_"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # turn and conversation ids: uuid4 hex from the service, or the client's


class ServeLimits(Strict):
    """Request limits and capacity of one service process; each field reads CASTBOT_SERVE_<NAME>."""

    max_message_chars: int = Field(1000, ge=1, description="Longest accepted message, in characters.")
    max_turn_chars: int = Field(1000, ge=1, description="Longest accepted history turn, in characters.")
    max_history_turns: int = Field(50, ge=0, description="Most history turns a chat request may send.")
    max_new_tokens: int = Field(128, ge=1, description="Largest max_new_tokens a request may ask for.")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one /generate request.")
    max_scene_turns: int = Field(16, ge=1, description="Most lines one /scene request may ask for (each costs one "
                                 "request of the rate limit).")
    max_request_bytes: int = Field(65536, ge=1024, description="Largest request body, in bytes (413 beyond).")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight beyond which the service answers 503.")
    timeout_s: int = Field(60, ge=1, description="A request still running after this many seconds gets a 504.")
    engine: Literal[("auto", *ENGINES)] = Field(
        "auto", description="auto: openvino on CPU when the Bento holds its OpenVINO export, else continuous; "
        "continuous: transformers' continuous batching, requests join and leave the running batch at every decoding "
        "step; adaptive: requests that queue up while a batch runs form the next static batch; openvino: OpenVINO "
        "GenAI's continuous batching on CPU, the Bento's export (or one made at start-up) (castbot/engines/).")
    batching: bool = Field(True, description="Adaptive engine only: batch queued requests (false: one at a time).")
    max_batch_size: int = Field(32, ge=2, description="Most prompts the model runs in one batch.")
    max_latency_ms: int = Field(30000, ge=10, description="Adaptive engine: longest a request may wait in the queue "
                                "for its batch; beyond it a 503. "
                                "SmolLM2-135M on 2 CPU cores takes 6-13 s for a batch of 32 replies of 40 tokens.")
    dtype: Literal["fast", "auto", "float32", "bfloat16", "float16"] = Field(
        "fast", description="Weights' dtype. fast: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, AMX), "
        "else fp32; auto: as evaluation ran (fp32 on CPU).")
    prefix_caching: bool = Field(True, description="OpenVINO engine: keep the attention cache of prompts already "
                                 "computed and reuse it for a prompt that starts the same way (a chat's or a scene's "
                                 "next turn), within the engine's cache size.")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default, one per core); "
                               "1 is often faster on a machine shared with other jobs.")


def load_limits(environ: dict[str, str] | None = None) -> ServeLimits:
    """ServeLimits from CASTBOT_SERVE_* variables, e.g. CASTBOT_SERVE_MAX_CONCURRENCY=32."""
    environ = os.environ if environ is None else environ
    raw = {name: environ[ENV_PREFIX + name.upper()] for name in ServeLimits.model_fields
           if ENV_PREFIX + name.upper() in environ}
    return ServeLimits.model_validate(raw)


LIMITS = load_limits()  # request models below take their bounds from it


# "Not blank": one character that no engine calls whitespace. \S differs between readers: JSON Schema uses ECMA-262
# (U+0085 is not a space, U+FEFF is), pydantic-core's Rust regex and Python's re the Unicode property (U+0085 is).
# An explicit class of the union reads the same in all three, so the published schema says what is accepted.
BLANK = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = f"[^{BLANK}]"


def _text(max_chars: int) -> type[str]:
    # no stripping here: the published schema must describe exactly what is accepted
    return Annotated[str, StringConstraints(min_length=1, max_length=max_chars, pattern=NOT_BLANK)]


class Sampling(BaseModel):
    """Sampling settings; defaults are castbot.model.dialogue.DECODING_DEFAULTS, shared with evaluation."""

    model_config = STRICT_JSON

    max_new_tokens: int = Field(min(DECODING_DEFAULTS["max_new_tokens"], LIMITS.max_new_tokens), ge=1,
                                le=LIMITS.max_new_tokens, description="Most tokens in the reply.")
    temperature: float = Field(DECODING_DEFAULTS["temperature"], ge=0, le=2,
                               description="Sampling temperature; below 0.01 (e.g. 0) decodes greedily.")
    # ge, not gt: a numeric exclusiveMinimum is OpenAPI 3.1, and the Bento publishes 3.0
    top_p: float = Field(DECODING_DEFAULTS["top_p"], ge=0.01, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(DECODING_DEFAULTS["top_k"], ge=0, le=1000, description="Sample from the k likeliest; 0: all.")
    no_repeat_ngram_size: int = Field(DECODING_DEFAULTS["no_repeat_ngram_size"], ge=0, le=10,
                                      description="Never repeat an n-gram of this size; 0: off. Applied by the "
                                      "adaptive engine only: transformers' continuous batching has no such "
                                      "processor, and OpenVINO GenAI applies it in beam search only.")

    def decoding(self) -> dict:
        """The engine's settings."""
        return self.model_dump(include=set(Sampling.model_fields))


class Decoding(Sampling):
    """Sampling settings and, for a cast model, who answers."""

    character: str = Field("", max_length=64, pattern=f"^$|{NOT_BLANK}",
                           description="A cast model: the member who answers (any case; omitted or empty: the first "
                           "of the cast). GET /v1/models lists them as MODEL/Character.")


class Turn(BaseModel):
    model_config = STRICT_JSON

    speaker: str = Field("", max_length=64, description="Who said it: a name, or user/bot ('bot' and 'assistant' "
                         "mean the character). Chat-format models see names; eos-format models ignore them.")
    text: _text(LIMITS.max_turn_chars) = Field(..., description="What was said.")


class Prompt(Decoding):
    turns: list[_text(max(LIMITS.max_turn_chars, LIMITS.max_message_chars)) | Turn] = Field(
        ..., min_length=1, max_length=LIMITS.max_history_turns + 1,
        description="The conversation so far, oldest first; the reply continues it. A turn is its text, or "
        "{speaker, text} (chat-format models see 'Name: line').")

    def named_turns(self) -> list[tuple[str, str]]:
        return [(t.speaker.strip(), t.text.strip()) if isinstance(t, Turn) else ("", t.strip()) for t in self.turns]


class GenerateRequest(BaseModel):
    model_config = STRICT_JSON

    prompts: list[Prompt] = Field(..., min_length=1, max_length=LIMITS.max_prompts,
                                  description="Prompts to continue; each may carry its own decoding settings.")


class Generation(BaseModel):
    reply: str = Field(..., description="The generated turn, up to the first end-of-turn token.")
    prompt_tokens: int = Field(..., description="Tokens of the prompt after truncating the oldest turns.")
    new_tokens: int = Field(..., description="Tokens generated, including the end-of-turn token.")
    turn_id: str = Field(..., description="This turn in the conversation log: what POST /feedback rates.")
    conversation_id: str = Field(..., description="The conversation this turn belongs to; send it back with the "
                                 "next /chat request to keep the turns of one chat together.")


class ChatRequest(Decoding):
    history: list[Turn] = Field(default_factory=list, max_length=LIMITS.max_history_turns,
                                description="Earlier turns, oldest first; empty for a single-turn chat.")
    message: _text(LIMITS.max_message_chars) = Field(..., description="The user's new message.")
    conversation_id: str = Field("", pattern=r"^([A-Za-z0-9_.:-]{1,64})?$", max_length=64,
                                 description="The conversation_id of an earlier reply in this chat; omitted or "
                                 "empty: a new conversation.")


Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NOT_BLANK)]


class SceneRequest(Sampling):
    characters: list[Name] = Field(default_factory=list, max_length=8,
                                   description="Cast members who speak, in turn (any case; a name may recur); "
                                   "omitted or empty: the whole cast, in its order.")
    opening: _text(LIMITS.max_message_chars) | Turn = Field(..., description="The line that opens the scene: its "
                                                           "text (the user's), or {speaker, text}.")
    turns: int = Field(min(6, LIMITS.max_scene_turns), ge=1, le=LIMITS.max_scene_turns,
                       description="Lines the characters speak after the opening, in the order of characters.")
    conversation_id: str = Field("", pattern=r"^([A-Za-z0-9_.:-]{1,64})?$", max_length=64,
                                 description="Log the scene's turns in this conversation of yours; omitted or empty: "
                                 "a new conversation.")


class Feedback(BaseModel):
    """A user's rating of one served turn."""

    model_config = STRICT_JSON

    turn_id: str = Field(..., pattern=ID_PATTERN, max_length=64, description="The turn_id of the rated reply.")
    rating: int = Field(..., description="+1: a good reply, -1: a bad one.", json_schema_extra={"enum": [1, -1]})
    comment: str = Field("", max_length=LIMITS.max_message_chars, description="Why, in the user's words (optional).")


    @field_validator("rating")
    @classmethod
    def _one_or_minus_one(cls, rating: int) -> int:
        if rating not in (1, -1):  # strict ints: true and 1.0 are refused before this
            raise ValueError("rating is 1 (good) or -1 (bad)")
        return rating


class FeedbackSaved(BaseModel):
    turn_id: str = Field(..., description="The rated turn.")
    rating: int = Field(..., description="The rating now stored for it (a later rating replaces an earlier one).")


class ChatReply(Generation):
    model_name: str = Field(..., description="Registered MLflow model that answered.")
    model_version: str = Field(..., description="Its MLflow model version.")
    character: str = Field(..., description="The character the model speaks as.")


USER_LABELS = {"", "user", "you", "human", "me"}
BOT_LABELS = {"bot", "assistant"}


def speaker_name(label: str, character: str) -> str:
    """A history turn's speaker as the model saw speakers in training: the character's name for the bot's own
    turns, '' for the user, other names as given."""
    key = label.strip().lower()
    if key in BOT_LABELS or key == character.lower():
        return character
    return "" if key in USER_LABELS else label.strip()


def chat_prompt(request: ChatRequest) -> Prompt:
    """The /generate prompt for a chat: history then the message (the user's), with the request's decoding.
    Speakers are resolved (bot -> the character) by conversation()."""
    return Prompt(turns=[*request.history, request.message], character=request.character, **request.decoding())


def conversation(prompt: Prompt, character: str) -> list[tuple[str, str]]:
    """The prompt's turns as (speaker, text), speakers as the model saw them in training."""
    return [(speaker_name(s, character), t) for s, t in prompt.named_turns()]


def as_generation(reply, turn: dict[str, str]) -> Generation:
    """A castbot.bot.Reply as the API returns it, with its turn_id and conversation_id."""
    return Generation(reply=reply.reply, prompt_tokens=reply.prompt_tokens, new_tokens=reply.new_tokens, **turn)
