"""The dialogue format, written once: training, evaluation and the service all import it.

Two styles, chosen per base model (`DialogueFormat.choose`):

- "eos", the DialoGPT layout for GPT-2-family models: every turn is followed by the end-of-sequence token,
      turn_1 <eos> turn_2 <eos> ... turn_k <eos> response <eos>
  and the model learns to continue a prompt that ends with <eos> by writing the next turn. Names are not used.
- "chat", for models that ship a chat template (SmolLM2 and other instruct models): a system line naming the
  character and the show, the context lines as one user turn ("Morty: Rick, wait!" one per line), and the
  character's line as the assistant turn, ended by the tokenizer's end-of-turn token (SmolLM2: <|im_end|>).
  Measured on the Rick profile (docs/fine-tuning.md): the eos layout on a chat model leaks "assistant\\n" into
  every reply and keeps the helpful-assistant voice; the chat layout answers in character.

A turn is (speaker, text); the speaker may be "" (unnamed, e.g. the user of the service).
"""

from dataclasses import dataclass
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


def sample_turns(sample: dict) -> list[Turn]:
    """(speaker, text) context turns of a dialogue sample; samples built before speakers were kept have none."""
    return list(zip(sample.get("speakers") or [""] * len(sample["context"]), sample["context"]))


def plain(tokenizer, text: str) -> str:
    """Text with the tokenizer's special tokens removed: a line or a request cannot forge template turns
    (`<|im_end|>\n<|im_start|>system ...` would otherwise encode as real turn markers)."""
    for token in tokenizer.all_special_tokens:
        text = text.replace(token, "")
    return text


def _turn_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]


def _eos_prompt_ids(tokenizer, turns: list[str], max_tokens: int) -> list[int]:
    """eos style: token ids for the turns so far, ending in <eos>; oldest turns dropped first to fit max_tokens."""
    if max_tokens < 1:
        raise ValueError(f"no room for a prompt: max_tokens={max_tokens}")
    ids: list[int] = []
    for turn in reversed(turns):
        turn_ids = _turn_ids(tokenizer, turn)
        if len(ids) + len(turn_ids) > max_tokens:
            if not ids:  # the newest turn alone is too long: keep its end
                ids = turn_ids[-max_tokens:]
            break
        ids = turn_ids + ids
    return ids


def _response_ids(tokenizer, response: str, max_length: int) -> list[int]:
    """The response and its end-of-turn token; only a response that alone exceeds max_length - 1 is cut."""
    ids = _turn_ids(tokenizer, response)[: max_length - 1]
    ids[-1] = tokenizer.eos_token_id
    return ids


def _labelled(context_ids: list[int], response_ids: list[int], loss_on: str) -> dict:
    input_ids = context_ids + response_ids
    labels = list(input_ids) if loss_on == "all" else [IGNORE_INDEX] * len(context_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _eos_sample(tokenizer, context: list[str], response: str, max_length: int, loss_on: str) -> dict:
    """eos style: one training sample; the context is cut from the left."""
    response_ids = _response_ids(tokenizer, response, max_length)
    context_ids = _eos_prompt_ids(tokenizer, context, max_length - len(response_ids)) if context else []
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

    def system_line(self) -> str:
        who = f"{self.character} from {self.show}" if self.show else self.character
        return f"You are {who}. Reply in character."

    def _chat_ids(self, tokenizer, turns: list[Turn]) -> list[int]:
        turns = [(plain(tokenizer, speaker), plain(tokenizer, text).strip()) for speaker, text in turns]
        user = "\n".join(f"{speaker}: {text}" if speaker else text for speaker, text in turns)
        messages = [{"role": "system", "content": self.system_line()}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, tokenizer, turns: list[Turn], max_tokens: int) -> list[int]:
        """Token ids that end where the character's reply starts; oldest turns dropped first to fit max_tokens."""
        if self.style == "eos":
            return _eos_prompt_ids(tokenizer, [text for _, text in turns], max_tokens)
        turns = list(turns)
        ids = self._chat_ids(tokenizer, turns)
        while len(ids) > max_tokens and len(turns) > 1:
            turns.pop(0)
            ids = self._chat_ids(tokenizer, turns)
        if len(ids) > max_tokens and turns:  # the newest turn alone is too long: keep the end of its text
            speaker, text = turns[0]
            text_ids = tokenizer.encode(text.strip(), add_special_tokens=False)
            room = len(text_ids) - (len(ids) - max_tokens)
            while len(ids) > max_tokens and room > 0:  # re-encoding a cut text can shift a token or two
                ids = self._chat_ids(tokenizer, [(speaker, tokenizer.decode(text_ids[-room:]))])
                room -= max(1, len(ids) - max_tokens)
            if len(ids) > max_tokens:
                ids = self._chat_ids(tokenizer, [])  # not even the speaker's name fits: no context
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
        response_ids = _response_ids(tokenizer, response, max_length - floor)  # a very long line keeps its start
        context_ids = self.prompt_ids(tokenizer, context, max_length - len(response_ids))
        return _labelled(context_ids, response_ids, loss_on)


def decode_reply(tokenizer, generated_ids: list[int]) -> str:
    """Text of one generated turn: everything up to the first end-of-turn token."""
    if tokenizer.eos_token_id in generated_ids:
        generated_ids = generated_ids[: generated_ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated_ids, skip_special_tokens=True).strip()
