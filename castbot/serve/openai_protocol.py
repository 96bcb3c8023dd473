"""The OpenAI chat-completions protocol on castbot's one generation path: request and response shapes, the
mapping of OpenAI messages to castbot turns, stop strings, and OpenAI's error shape. service.py serves it at
/v1/chat/completions and /v1/models with the same engine, limits, admission, metrics and conversation log as /chat.

    prompt, stops = to_prompt(ChatCompletionRequest.model_validate(body), model_name)
    completion(turn, model_name, created, reply_text, finish_reason, reply)     # the response body

Messages become castbot turns, oldest first: user -> the user (their `name` as the speaker when given),
assistant -> the character, system/developer -> a leading turn spoken by "system" (the model's own character and
system line stay: castbot's format has no slot for a client's instructions, so they are context the model reads,
dropped first when the prompt is over the token budget). The last message must be the user's.
"""

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, ValidationError

from castbot.model.dialogue import DECODING_DEFAULTS
from castbot.serve.schemas import ID_PATTERN, LIMITS, Prompt, Turn

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string: a stream holds back up to this many characters that may start one
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
# tagged by JSON type: a refusal names the bound that was broken, not the other member's "should be a valid string"
Stops = Annotated[Annotated[StopString, Tag("str")]
                  | Annotated[list[StopString], Field(max_length=MAX_STOPS), Tag("list")],
                  Discriminator(lambda value: "str" if isinstance(value, str) else "list")]


class OpenAIError(Exception):
    """A refusal in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 409: "invalid_request_error",
             404: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": OpenAIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. an assistant message's `refusal`, `annotations`: null

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """What castbot reads of an OpenAI chat-completions request; other OpenAI fields are checked by `unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(..., min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0.01, le=1)
    top_k: int | None = Field(None, ge=-1, le=1000, description="vLLM's extension; 0 or -1: all tokens.")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stops | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    conversation_id: str | None = Field(None, pattern=ID_PATTERN, description="castbot's extension: groups turns "
                                        "in the conversation log, as /chat's conversation_id.")


# OpenAI parameters castbot cannot honour, accepted only at the value that means "off"
NEUTRAL: dict[str, Any] = {
    "n": lambda v: v in (None, 1),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True,  # meaningless without tools
    "response_format": lambda v: v is None or v == {"type": "text"},
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}
# sent by OpenAI clients, about the caller rather than the reply: accepted and not used
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}


def unsupported(request: ChatCompletionRequest) -> OpenAIError | None:
    """A 400 naming the first parameter castbot cannot honour (n > 1, tools, logprobs, ...) or does not know."""
    for name, value in (request.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name not in NEUTRAL:
            return OpenAIError(400, f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
        if not NEUTRAL[name](value):
            return OpenAIError(400, f"{name}={value!r} is not supported by castbot (one reply per request, plain "
                               "text, no tools, logprobs or penalties); omit it", name, "unsupported_parameter")
    if request.seed is not None and (request.temperature is None or request.temperature >= 0.01):
        return OpenAIError(400, "seed is only accepted with temperature 0: castbot samples requests in shared "
                           "batches and cannot seed one of them; send temperature 0 for a reproducible reply",
                           "seed", "unsupported_parameter")
    return None


def parse_request(body: Any) -> ChatCompletionRequest:
    """The request, or an OpenAIError 400 naming the bad parameter."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", None, "invalid_request_body")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
        raise OpenAIError(400, f"{param}: {first['msg']}", param, "invalid_value") from None
    if refusal := unsupported(request):
        raise refusal
    return request


def _turns(messages: list[Message]) -> list[Turn | str]:
    """Messages as castbot turns (system -> a "system" turn, user -> its name or the user, assistant -> the
    character); blank assistant and system messages are skipped, the newest turns kept within max_history_turns."""
    turns = []
    for i, message in enumerate(messages):
        text, last = message.text(), i == len(messages) - 1
        # the message (a plain turn, the user's) and history turns ({speaker, text}) have limits of their own
        plain_message = last and not message.name
        limit = LIMITS.max_message_chars if plain_message else LIMITS.max_turn_chars
        if len(text) > limit:
            raise OpenAIError(400, f"messages[{i}].content is {len(text)} characters, over the "
                              f"limit of {limit} (CASTBOT_SERVE_MAX_{'MESSAGE' if plain_message else 'TURN'}_CHARS)",
                              f"messages[{i}].content", "string_above_max_length")
        if not text.strip():
            if message.role == "user":
                raise OpenAIError(400, f"messages[{i}].content is empty", f"messages[{i}].content", "invalid_value")
            continue
        speaker = {"system": "system", "developer": "system", "assistant": "assistant"}.get(
            message.role, message.name or "user")
        turns.append(text if plain_message else Turn(speaker=speaker, text=text))
    return turns[-(LIMITS.max_history_turns + 1):]  # the oldest beyond the limit would be cut by the token budget


def to_prompt(request: ChatCompletionRequest, model_name: str,
              cast: Sequence[str] = ()) -> tuple[Prompt, list[str]]:
    """The castbot Prompt of an OpenAI request and its stop strings; OpenAIError for what castbot refuses. A cast
    model also answers as MODEL/Character for every member (the reply path checks the name)."""
    name, _, character = request.model.partition("/")
    if name != model_name or (character and len(cast) < 2):
        raise OpenAIError(404, f"the model {request.model!r} does not exist: this service serves "
                          f"{', '.join(model_ids(model_name, cast))} (GET /v1/models)", "model", "model_not_found")
    if request.messages[-1].role != "user":
        raise OpenAIError(400, "messages: the last message must be the user's; castbot replies to it as the character",
                          f"messages[{len(request.messages) - 1}].role", "invalid_value")
    wanted = request.max_completion_tokens or request.max_tokens or DECODING_DEFAULTS["max_new_tokens"]
    decoding = {"max_new_tokens": min(wanted, LIMITS.max_new_tokens)}  # capped at the service's limit
    if request.temperature is not None:
        decoding["temperature"] = request.temperature
    if request.top_p is not None:
        decoding["top_p"] = request.top_p
    if request.top_k is not None:
        decoding["top_k"] = max(request.top_k, 0)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        prompt = Prompt(turns=_turns(request.messages), character=character, **decoding)
    except ValidationError as exc:  # a limit the checks above do not name (e.g. a speaker name)
        raise OpenAIError(400, f"messages: {exc.errors()[0]['msg']}", "messages", "invalid_value") from None
    return prompt, [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    found = [text.index(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


class StopCutter:
    """Applies stop strings to a stream: feed(piece) returns what can be sent now, holding back a tail that may
    be the start of a stop string; stopped is True once one was found (nothing after it is ever sent).

    Each stop string is followed by its Knuth-Morris-Pratt automaton, whose state is the longest prefix of the
    stop string that ends the text so far: a piece costs O(len(piece)) steps per stop string (amortised), however
    long the stop strings and the text. Only the unsent tail is kept for sending (shorter than the longest stop
    string); .text joins the pieces when asked."""

    def __init__(self, stops: list[str]):
        self.stops, self.sent, self.stopped = stops, 0, False
        self._pieces: list[str] = []
        self._length = 0  # characters fed
        self._held = ""  # the text from .sent on: a tail that may be the start of a stop string
        self._states = [0] * len(stops)  # per stop string: its longest prefix that ends the text
        self._fallback = [self._failure(stop) for stop in stops]

    @staticmethod
    def _failure(stop: str) -> list[int]:
        """KMP's table: [i] is the longest proper prefix of stop[: i + 1] that is also its suffix."""
        table, k = [0] * len(stop), 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = table[k - 1]
            if stop[i] == stop[k]:
                k += 1
            table[i] = k
        return table

    @property
    def text(self) -> str:
        """Everything fed so far."""
        return "".join(self._pieces)

    def _first_match(self, piece: str, offset: int) -> int | None:
        """Where the earliest stop string that ends in piece (at offset in the text) starts; advances the states."""
        first = None
        for n, (stop, table) in enumerate(zip(self.stops, self._fallback)):
            if not stop:  # the empty string is found at the start of any text
                first = 0
                continue
            state = self._states[n]
            for i, char in enumerate(piece):
                while state and stop[state] != char:
                    state = table[state - 1]
                if stop[state] == char:
                    state += 1
                    if state == len(stop):
                        start = offset + i + 1 - len(stop)
                        first = start if first is None else min(first, start)
                        break
            self._states[n] = state
        return first

    def feed(self, piece: str) -> str:
        self._pieces.append(piece)
        offset, self._length = self._length, self._length + len(piece)
        if self.stopped:
            return ""
        pending = self._held + piece  # the text from .sent on
        first = self._first_match(piece, offset)
        self.stopped = first is not None
        hold = 0 if self.stopped else max(self._states, default=0)
        end = first - self.sent if self.stopped else len(pending) - hold
        ready, self._held = pending[: max(end, 0)], "" if self.stopped else pending[max(end, 0):]
        self.sent += len(ready)
        return ready

    def flush(self) -> str:
        """The held-back tail once the reply ended without a stop string."""
        rest, self._held = ("" if self.stopped else self._held), ""
        self.sent += len(rest)
        return rest


def usage(reply) -> dict[str, int]:
    """OpenAI's token counts of a castbot Reply (completion tokens include the end-of-turn token)."""
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.new_tokens,
            "total_tokens": reply.prompt_tokens + reply.new_tokens}


def finish_reason(reply, stopped: bool) -> str:
    """OpenAI's finish_reason: "stop" at an end-of-turn token or a stop string, "length" at max_tokens."""
    return "stop" if stopped or reply.finish_reason == "stop" else "length"


def completion(turn: dict[str, str], model: str, created: int, text: str, reason: str, reply) -> dict:
    """A chat.completion body; turn_id and conversation_id are castbot's extensions (POST /feedback rates the
    turn_id)."""
    return {"id": f"chatcmpl-{turn['turn_id']}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(reply), "system_fingerprint": None, **turn}


def chunk(turn: dict[str, str], model: str, created: int, delta: dict, reason: str | None = None,
          usage_counts: dict | None = None) -> dict:
    """A chat.completion.chunk; the usage-only last chunk (stream_options.include_usage) has no choices."""
    body = {"id": f"chatcmpl-{turn['turn_id']}", "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [] if usage_counts else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": reason}]}
    if usage_counts:
        body["usage"] = usage_counts
    return body


def model_ids(model_name: str, cast: Sequence[str] = ()) -> list[str]:
    """The served model's names: MODEL, and MODEL/Character for each member of a cast."""
    return [model_name, *(f"{model_name}/{member}" for member in cast if len(cast) > 1)]


def models_list(identity: dict[str, str], created: int | None = None, cast: Sequence[str] = ()) -> dict:
    """GET /v1/models: the served model, with castbot's version and (default) character; a cast model also as
    MODEL/Character for each member."""
    created = created or int(time.time())
    characters = [identity["character"], *(member for member in cast if len(cast) > 1)]
    return {"object": "list", "data": [
        {"id": model_id, "object": "model", "created": created, "owned_by": "castbot",
         "version": identity["model_version"], "character": character}
        for model_id, character in zip(model_ids(identity["model_name"], cast), characters)]}
