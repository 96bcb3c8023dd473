"""The dialogue format, written once: training, evaluation and the service all import it.

A sample is the DialoGPT layout: every turn is followed by the tokenizer's end-of-sequence token,
    turn_1 <eos> turn_2 <eos> ... turn_k <eos> response <eos>
and the model learns to continue a prompt that ends with <eos> by writing the next turn.
"""

IGNORE_INDEX = -100  # label value the loss skips

# Decoding defaults from the public Rick-bot recipes; evaluation samples and the service share them.
DECODING_DEFAULTS = {
    "max_new_tokens": 40,
    "temperature": 0.8,
    "top_p": 0.7,
    "top_k": 100,
    "no_repeat_ngram_size": 3,
}


def _turn_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]


def prompt_ids(tokenizer, turns: list[str], max_tokens: int) -> list[int]:
    """Token ids for the turns so far, ending in <eos>; oldest turns dropped first to fit max_tokens."""
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


def encode_sample(tokenizer, context: list[str], response: str, max_length: int, loss_on: str = "response") -> dict:
    """One training sample; the context is cut from the left. Only a response that alone exceeds
    max_length - 1 tokens is cut: it keeps its start and still ends in <eos>."""
    response_ids = _turn_ids(tokenizer, response)[: max_length - 1]
    if response_ids[-1] != tokenizer.eos_token_id:
        response_ids[-1] = tokenizer.eos_token_id
    context_ids = prompt_ids(tokenizer, context, max_length - len(response_ids)) if context else []
    input_ids = context_ids + response_ids
    if loss_on == "all":
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(context_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def decode_reply(tokenizer, generated_ids: list[int]) -> str:
    """Text of one generated turn: everything up to the first <eos>."""
    if tokenizer.eos_token_id in generated_ids:
        generated_ids = generated_ids[: generated_ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated_ids, skip_special_tokens=True).strip()
