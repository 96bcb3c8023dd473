"""One object answers: the service, the MLflow model, sample replies, evaluation and the benchmarks all use Bot.

    bot = Bot.load("path/to/model")                     # any save_pretrained causal LM, or a castbot LoRA adapter
    bot.generate([[("Morty", "Rick, where are we going?")]], temperature=0)
    bot.score(samples)                                  # per-sample loss sums, for perplexity
"""

import math
from dataclasses import dataclass
from typing import Literal

from castbot.model.dialogue import DECODING_DEFAULTS, IGNORE_INDEX, DialogueFormat, Turn, decode_reply, sample_turns
from castbot.model.folder import load_tokenizer, load_weights, pick_device, read_card

MIN_TEMPERATURE = 0.01  # lower temperatures decode greedily

# stop: an end-of-turn token; length: max_new_tokens; cancelled: the client left (or a stop event); error: it failed
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class Reply:
    reply: str
    prompt_tokens: int  # tokens of the prompt after dropping the oldest turns
    new_tokens: int  # tokens generated, including the end-of-turn token
    finish_reason: FinishReason

    @property
    def hit_max_tokens(self) -> bool:
        """Stopped by max_new_tokens, not by an end-of-turn token."""
        return self.finish_reason == "length"


def assemble_reply(tokenizer, prompt_tokens: int, generated: list[int], cancelled: bool = False) -> Reply:
    """The Reply of a row of generated token ids: cut after its first end-of-turn token, decoded and counted."""
    eos = tokenizer.eos_token_id
    ended = eos in generated
    new = generated[: generated.index(eos) + 1] if ended else generated
    reason = "stop" if ended else "cancelled" if cancelled else "length"
    return Reply(decode_reply(tokenizer, new), prompt_tokens, len(new), reason)


def sampling_settings(**decoding) -> dict | None:
    """temperature, top_p and top_k of a request (DECODING_DEFAULTS filled in), or None where it decodes greedily:
    below MIN_TEMPERATURE the logits / temperature overflow."""
    settings = {**DECODING_DEFAULTS, **decoding}
    if settings["temperature"] < MIN_TEMPERATURE:
        return None
    return {"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
            "top_k": settings["top_k"]}


def position_limit(config) -> int:
    """Longest sequence the model's position table holds (GPT-2: n_positions, Llama and most others:
    max_position_embeddings)."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad token rows to one width: (input_ids, attention_mask), both (batch, width)."""
    width = max(len(row) for row in rows)
    return ([[pad_id] * (width - len(row)) + row for row in rows],
            [[0] * (width - len(row)) + [1] * len(row) for row in rows])


class Bot:
    """A loaded model with its tokenizer and dialogue format: replies to conversations and scores samples."""

    def __init__(self, tokenizer, model, fmt: DialogueFormat, max_length: int | None = None,
                 folder: str | None = None, config=None):
        self.tokenizer, self.model, self.format = tokenizer, model, fmt  # model None: prompts only (load's weights)
        self.folder = folder  # where it was loaded from (engines that convert the model read it)
        self.positions = position_limit(config or model.config)
        # the prompt budget is the length the model was trained on, not its position table (8k for SmolLM2)
        self.max_length = min(max_length or self.positions, self.positions)

    @classmethod
    def load(cls, folder: str, fmt: DialogueFormat | None = None, device: str | None = None,
             torch_threads: int = 0, max_length: int | None = None, dtype: str = "auto",
             weights: bool = True) -> "Bot":
        """Load a model folder; its castbot.json gives the format and trained length unless fmt is given.
        dtype as castbot.model.folder.pick_device's. weights=False: tokenizer, format and config only, for an
        engine that runs the model itself (OpenVINO's)."""
        import torch
        from transformers import AutoConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        card = read_card(folder)  # None for a plain base model: eos format, its position table as the budget
        fmt = fmt or (card.format if card else DialogueFormat())
        device, torch_dtype = pick_device(device, dtype)
        model = load_weights(folder, torch_dtype).to(device).eval() if weights else None
        return cls(load_tokenizer(folder), model, fmt, max_length or (card.max_length if card else None), folder,
                   None if weights else AutoConfig.from_pretrained(folder))

    @property
    def device(self):
        import torch

        return self.model.device if self.model is not None else torch.device("cpu")

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed: at most the trained length, and prompt + reply within the position table."""
        return max(1, min(self.max_length, self.positions - max_new_tokens))

    def prompt(self, turns: list[Turn], max_new_tokens: int, character: str | None = None, step: int = 1) -> list[int]:
        """The prompt's ids; a cast model answers as `character` (None: its first); a long history loses its oldest
        turns `step` at a time (DialogueFormat.prompt_ids)."""
        return self.format.speaking(character).prompt_ids(self.tokenizer, turns, self.prompt_budget(max_new_tokens),
                                                          step=step)

    def generate(self, conversations: list[list[Turn]], streamer=None, stopping_criteria=None,
                 characters: list[str | None] | None = None, **decoding) -> list[Reply]:
        """One reply per conversation, in one left-padded generate() call; decoding as DECODING_DEFAULTS.
        A transformers streamer (one conversation only) receives the tokens as they come (the adaptive engine's
        stream); stopping_criteria can end generation early."""
        import torch

        settings = {**DECODING_DEFAULTS, **decoding}
        max_new = settings["max_new_tokens"]
        characters = characters or [None] * len(conversations)  # a cast model: who answers each conversation
        rows = [self.prompt(turns, max_new, who) for turns, who in zip(conversations, characters)]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask = (torch.tensor(t, device=self.device) for t in left_pad(rows, pad))  # (batch, width) each
        width = ids.shape[1]
        sampled = sampling_settings(**settings)
        sampling = {"do_sample": True, **sampled} if sampled else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(  # (batch, width) -> (batch, width + new)
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=1,  # never an empty turn
                no_repeat_ngram_size=settings["no_repeat_ngram_size"], pad_token_id=pad, eos_token_id=eos,
                streamer=streamer, stopping_criteria=stopping_criteria, **sampling)
        return [assemble_reply(self.tokenizer, len(prompt), row) for row, prompt in zip(out[:, width:].tolist(), rows)]

    def encode(self, sample: dict, max_length: int) -> dict:
        """A {context, speakers, response} sample as input_ids/attention_mask/labels, loss on the response; a cast
        model's sample is prompted as its `character`."""
        fmt = self.format.speaking(sample.get("character"))
        return fmt.encode_sample(self.tokenizer, sample_turns(sample), sample["response"], max_length)

    def score(self, encoded: list[dict], batch_size: int = 16) -> list[tuple[float, int]]:
        """(sum of token losses in nats, target tokens) per encoded sample: perplexity = exp(sum / sum)."""
        return sample_losses(self.model, encoded, self.tokenizer.pad_token_id, batch_size)


def sample_losses(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of token losses in nats, target tokens) per row of input_ids/attention_mask/labels.

    Rows are batched by length (little padding); padding carries IGNORE_INDEX labels and a 0 mask, so each
    row's figures equal those of running it alone.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    results: dict[int, tuple[float, int]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            width = max(len(rows[i]["input_ids"]) for i in indices)

            def pad(key, value, width=width, indices=indices):
                return torch.tensor([list(rows[i][key]) + [value] * (width - len(rows[i][key])) for i in indices],
                                    device=device)

            labels = pad("labels", IGNORE_INDEX)[:, 1:]  # (batch, seq - 1): position t predicts token t + 1
            logits = model(input_ids=pad("input_ids", pad_token_id),
                           attention_mask=pad("attention_mask", 0)).logits[:, :-1].float()  # (batch, seq - 1, vocab)
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                     reduction="none")  # (batch, seq - 1), 0 where ignored
            for i, loss, label in zip(indices, losses, labels):
                results[i] = (float(loss.sum()), int((label != IGNORE_INDEX).sum()))
    return [results[i] for i in range(len(rows))]


def exp_mean(total_loss: float, count: int) -> float:
    """exp(total / count), inf on overflow, nan for no tokens."""
    if not count:
        return math.nan
    mean = total_loss / count
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < 700 else math.inf  # math.exp overflows past ~709
