"""The dialogue format, written once: training, evaluation and the service all import it.

Two styles, chosen per base model (`DialogueFormat.choose`):

- "eos", the DialoGPT layout for GPT-2-family models: every turn is followed by the end-of-sequence token,
      turn_1 <eos> turn_2 <eos> ... turn_k <eos> response <eos>
  and the model learns to continue a prompt that ends with <eos> by writing the next turn. Names are not used.
- "chat", for models that ship a chat template (SmolLM2 and other instruct models): a system line naming the
  character and the show, the context lines as one user turn ("Morty: Rick, wait!" one per line), and the
  character's line as the assistant turn, ended by the tokenizer's end-of-turn token (SmolLM2: <|im_end|>).
  A cast model learns several characters: each sample's system line names its own speaker
  (`DialogueFormat.speaking`, "You are Morty from Rick and Morty."); the eos layout has no place for a name.
  Measured on the Rick profile (docs/fine-tuning.md): the eos layout on a chat model leaks "assistant\\n" into
  every reply and keeps the helpful-assistant voice; the chat layout answers in character.

A turn is (speaker, text); the speaker may be "" (unnamed, e.g. the user of the service).

No text forges a turn, in training samples or prompts (TokenGuard): the tokenizer's special and added tokens are
removed from every turn, speaker and response to a fixed point; in the chat format, where a line break starts a
speaker's line, a turn's line breaks become spaces. The eos format keeps them: only <eos> ends a turn there.
A long history is trimmed by summing each turn's token count once, newest first (as the eos format always did).
"""

import functools
import re
from dataclasses import dataclass, replace
from typing import Literal

IGNORE_INDEX = -100  # label value the loss skips

# Decoding defaults from the public Rick-bot recipes; evaluation samples and the service share them.
DECODING_DEFAULTS = {
    "max_new_tokens": 40,
    "temperature": 0.8,
    "top_p": 0.7,
    "top_k": 100,
    "no_repeat_ngram_size": 3,
}

Turn = tuple[str, str]  # (speaker, text)


# A line break inside a chat-format turn would start a line that reads as another speaker's ("Rick: ..."): such
# turns are collapsed to one line. These are the characters str.splitlines() breaks at.
LINE_BREAKS = re.compile(r"\s*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]\s*")
# Characters tokenised per budget token at most: a turn longer than this is taken as over the budget and only its
# newest (a response: first) CHARS_PER_TOKEN * budget characters are looked at. English averages ~4 per token.
CHARS_PER_TOKEN = 16
# A chat prompt of at most this many characters per budget token is encoded whole first: it usually fits, and
# a fitting prompt (most training samples) then costs one encode, as before.
WHOLE_FIRST_CHARS_PER_TOKEN = 8


def sample_turns(sample: dict) -> list[Turn]:
    """(speaker, text) context turns of a dialogue sample; samples built before speakers were kept have none."""
    return list(zip(sample.get("speakers") or [""] * len(sample["context"]), sample["context"]))


@functools.lru_cache(maxsize=32)
def _token_table(tokens: frozenset[str]) -> tuple[re.Pattern | None, dict[str, tuple[str, ...]]]:
    """A pattern finding any of the tokens, and the tokens by their last character, longest first."""
    longest_first = sorted(tokens, key=len, reverse=True)
    by_last: dict[str, tuple[str, ...]] = {}
    for token in longest_first:
        by_last[token[-1]] = (*by_last.get(token[-1], ()), token)
    return (re.compile("|".join(map(re.escape, longest_first))) if tokens else None), by_last


class TokenGuard:
    """Keeps a tokenizer's special and added tokens out of turn texts, so no line or request can forge template
    turns or an end of turn: the tokenizer matches every added token in raw text (SmolLM2's <repo_name> too,
    which is not among all_special_tokens). Built once per prompt or sample."""

    def __init__(self, tokenizer):
        added = (token.content for token in tokenizer.added_tokens_decoder.values())
        self.pattern, self.by_last = _token_table(frozenset(t for t in [*tokenizer.all_special_tokens, *added] if t))

    def plain(self, text: str) -> str:
        """The text with every token removed, to a fixed point: one pass of removals would turn
        `<|im_<|im_end|>end|>` into a real `<|im_end|>`."""
        if self.pattern is None or not self.pattern.search(text):
            return text
        # left to right with a stack: a token completed by the next character (also one that a removal closed
        # up) comes off the end at once, so the kept text never holds a token
        kept: list[str] = []
        for char in text:
            kept.append(char)
            for token in self.by_last.get(char, ()):
                if len(kept) >= len(token) and "".join(kept[-len(token):]) == token:
                    del kept[-len(token):]
                    break
        return "".join(kept)

    def clean(self, text: str, one_line: bool = False) -> str:
        """A turn's text as a prompt holds it: stripped, no tokens, and with one_line no line breaks."""
        return self.plain(LINE_BREAKS.sub(" ", text) if one_line else text).strip()

    def line(self, speaker: str, text: str) -> str:
        """A chat-format context line, "Name: text" or the text, on one line: no text starts a speaker's line."""
        speaker, text = self.plain(LINE_BREAKS.sub(" ", speaker)), self.clean(text, one_line=True)
        return f"{speaker}: {text}" if speaker else text


def plain(tokenizer, text: str) -> str:
    """Text in which none of the tokenizer's special or added tokens remains (TokenGuard.plain)."""
    return TokenGuard(tokenizer).plain(text)


def _looked_at(text: str, max_tokens: int, keep: str) -> str:
    """The characters of a turn worth tokenising for a budget of max_tokens: its newest (keep="end") or first
    CHARS_PER_TOKEN * max_tokens; a longer turn's ids are cut to the budget anyway."""
    limit = CHARS_PER_TOKEN * max(max_tokens, 1)
    return text if len(text) <= limit else text[-limit:] if keep == "end" else text[:limit]


def _newest_within(turns: list[Turn], max_chars: int) -> int:
    """How many of the newest turns hold at most max_chars characters together (as "Name: text" lines)."""
    chars = 0
    for count, (speaker, text) in enumerate(reversed(turns)):
        chars += len(speaker) + len(text) + 3
        if chars > max_chars:
            return count
    return len(turns)


def _turn_ids(tokenizer, text: str) -> list[int]:
    """A cleaned turn's ids and the end-of-turn token."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def _eos_prompt_ids(tokenizer, turns: list[str], max_tokens: int, guard: TokenGuard) -> list[int]:
    """eos style: token ids for the turns so far, ending in <eos>; oldest turns dropped first to fit max_tokens.
    Each turn is tokenised once, newest first, until the budget is spent. Line breaks stay: turns are delimited
    by <eos> alone (names are never shown), and no text can hold an <eos>."""
    if max_tokens < 1:
        raise ValueError(f"no room for a prompt: max_tokens={max_tokens}")
    ids: list[int] = []
    for turn in reversed(turns):
        turn = turn.strip()
        if ids and len(turn) > CHARS_PER_TOKEN * max_tokens:
            break  # an older turn this long cannot fit beside the newer ones
        turn_ids = _turn_ids(tokenizer, guard.clean(_looked_at(turn, max_tokens, "end")))
        if len(ids) + len(turn_ids) > max_tokens:
            if not ids:  # the newest turn alone is too long: keep its end
                ids = turn_ids[-max_tokens:]
            break
        ids = turn_ids + ids
    return ids


def _response_ids(tokenizer, response: str, max_length: int, guard: TokenGuard) -> list[int]:
    """The response and its end-of-turn token; only a response that alone exceeds max_length - 1 is cut."""
    ids = _turn_ids(tokenizer, guard.clean(_looked_at(response.strip(), max_length, "start")))[: max_length - 1]
    ids[-1] = tokenizer.eos_token_id
    return ids


def _labelled(context_ids: list[int], response_ids: list[int], loss_on: str) -> dict:
    input_ids = context_ids + response_ids
    labels = list(input_ids) if loss_on == "all" else [IGNORE_INDEX] * len(context_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _eos_sample(tokenizer, context: list[str], response: str, max_length: int, loss_on: str) -> dict:
    """eos style: one training sample; the context is cut from the left."""
    guard = TokenGuard(tokenizer)
    response_ids = _response_ids(tokenizer, response, max_length, guard)
    context_ids = _eos_prompt_ids(tokenizer, context, max_length - len(response_ids), guard) if context else []
    return _labelled(context_ids, response_ids, loss_on)


@dataclass(frozen=True)
class DialogueFormat:
    """How turns become tokens for one model: the style and, for "chat", who the system line says it is."""

    style: Literal["eos", "chat"] = "eos"
    character: str = ""
    show: str = ""

    @classmethod
    def choose(cls, tokenizer, requested: str, character: str, show: str | None) -> "DialogueFormat":
        """auto: chat when the tokenizer has a chat template, else eos."""
        style = requested if requested != "auto" else ("chat" if getattr(tokenizer, "chat_template", None) else "eos")
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("dialogue.format=chat needs a tokenizer with a chat template; use eos for this model")
        return cls(style, character, show or "")

    def speaking(self, character: str | None) -> "DialogueFormat":
        """The format with the system line naming character (a cast model's sample or request); None or "": as is."""
        return replace(self, character=character) if character and character != self.character else self

    def system_line(self) -> str:
        who = f"{self.character} from {self.show}" if self.show else self.character
        return f"You are {who}. Reply in character."

    def _chat_ids(self, tokenizer, lines: list[str]) -> list[int]:
        """The template around cleaned context lines, one user turn, ending where the reply starts."""
        messages = [{"role": "system", "content": self.system_line()}, {"role": "user", "content": "\n".join(lines)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def _fit_lines(self, tokenizer, lines: list[str], max_tokens: int) -> tuple[list[int], int]:
        """(ids, first line kept) of the newest lines that fit, at least the newest (which may not fit): the lines
        the old way found (re-tokenising the prompt after each dropped line), with each line tokenised once and a few
        encodes."""
        if sum(map(len, lines)) <= WHOLE_FIRST_CHARS_PER_TOKEN * max_tokens:  # short: it likely fits whole
            ids = self._chat_ids(tokenizer, lines)
            if len(ids) <= max_tokens:
                return ids, 0
        ids = self._chat_ids(tokenizer, lines[-1:])
        if len(ids) > max_tokens or len(lines) == 1:
            return ids, len(lines) - 1
        older = lines[:-1]
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: one Rust call for all lines
        counts = ([len(e.ids) for e in backend.encode_batch(older, add_special_tokens=False)] if backend else
                  [len(tokenizer.encode(line, add_special_tokens=False)) for line in older])
        newline = len(tokenizer.encode("\n", add_special_tokens=False))
        start, total = len(lines) - 1, len(ids)
        while start > 0 and total + counts[start - 1] + newline <= max_tokens:  # summed, newest first
            start, total = start - 1, total + counts[start - 1] + newline
        if start < len(lines) - 1:
            ids = self._chat_ids(tokenizer, lines[start:])
        while len(ids) > max_tokens:  # the sum was short (a merge across a line break): drop more
            start += 1
            ids = self._chat_ids(tokenizer, lines[start:])
        while start > 0:  # the sum was long: keep the oldest line that still fits
            wider = self._chat_ids(tokenizer, lines[start - 1:])
            if len(wider) > max_tokens:
                break
            start, ids = start - 1, wider
        return ids, start

    def _cut_newest(self, tokenizer, turn: Turn, ids: list[int], max_tokens: int, guard: TokenGuard) -> list[int]:
        """The newest turn alone is too long (ids): keep the end of its text, or no context at all."""
        speaker, text = turn
        text_ids = tokenizer.encode(guard.clean(text, one_line=True), add_special_tokens=False)
        room = len(text_ids) - (len(ids) - max_tokens)
        while len(ids) > max_tokens and room > 0:  # re-encoding a cut text can shift a token or two
            ids = self._chat_ids(tokenizer, [guard.line(speaker, tokenizer.decode(text_ids[-room:]))])
            room -= max(1, len(ids) - max_tokens)
        return ids if len(ids) <= max_tokens else self._chat_ids(tokenizer, [])  # not even the name fits

    def prompt_ids(self, tokenizer, turns: list[Turn], max_tokens: int, guard: TokenGuard | None = None,
                   step: int = 1) -> list[int]:
        """Token ids that end where the character's reply starts; oldest turns dropped first to fit max_tokens.
        step > 1 (chat format): turns are dropped from the start in multiples of step, so the next turn's prompt
        starts as this one does for up to `step` turns (a serving engine's prefix cache reuses that start)."""
        guard = guard or TokenGuard(tokenizer)
        if self.style == "eos":
            return _eos_prompt_ids(tokenizer, [text for _, text in turns], max_tokens, guard)
        if not turns:
            return self._fitting(self._chat_ids(tokenizer, []), max_tokens)
        *older, (speaker, newest) = turns
        newest = _looked_at(newest.strip(), max_tokens, "end")
        room = CHARS_PER_TOKEN * max_tokens - len(newest)  # characters worth looking at before the newest turn
        older = older[len(older) - _newest_within(older, room):]  # older turns cannot fit
        lines = [guard.line(s, t) for s, t in older] + [guard.line(speaker, newest)]
        ids, start = self._fit_lines(tokenizer, lines, max_tokens)
        dropped = len(turns) - len(lines) + start  # the oldest turns left out
        if step > 1 and dropped and len(ids) <= max_tokens:
            aligned = min(-(-dropped // step) * step, len(turns) - 1)
            if aligned > dropped:
                ids = self._chat_ids(tokenizer, lines[aligned - (len(turns) - len(lines)):])
        if len(ids) > max_tokens:
            ids = self._cut_newest(tokenizer, (speaker, newest), ids, max_tokens, guard)
        return self._fitting(ids, max_tokens)

    @staticmethod
    def _fitting(ids: list[int], max_tokens: int) -> list[int]:
        if len(ids) > max_tokens:
            raise ValueError(f"no room for a prompt: max_tokens={max_tokens}, the chat template takes {len(ids)}")
        return ids

    def encode_sample(self, tokenizer, context: list[Turn], response: str, max_length: int,
                      loss_on: str = "response") -> dict:
        """One training sample: prompt ids, then the response and its end-of-turn token (the loss target)."""
        if self.style == "eos":
            return _eos_sample(tokenizer, [text for _, text in context], response, max_length, loss_on)
        floor = len(self._chat_ids(tokenizer, []))  # the template and system line with no context
        if max_length - floor < 2:
            raise ValueError(f"dialogue.max_length={max_length} leaves no room for a reply: the chat template and "
                             f"system line alone take {floor} tokens")
        guard = TokenGuard(tokenizer)
        response_ids = _response_ids(tokenizer, response, max_length - floor, guard)  # a long line keeps its start
        context_ids = self.prompt_ids(tokenizer, context, max_length - len(response_ids), guard)
        return _labelled(context_ids, response_ids, loss_on)


def decode_reply(tokenizer, generated_ids: list[int]) -> str:
    """Text of one generated turn: everything up to the first end-of-turn token."""
    if tokenizer.eos_token_id in generated_ids:
        generated_ids = generated_ids[: generated_ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated_ids, skip_special_tokens=True).strip()
