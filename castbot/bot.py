"""One object answers: the service, the MLflow model, sample replies, evaluation and the benchmarks all use Bot.

    bot = Bot.load("path/to/model")                     # any save_pretrained causal LM, or a castbot LoRA adapter
    bot.generate([[("Morty", "Rick, where are we going?")]], temperature=0)
    bot.score(samples)                                  # per-sample loss sums, for perplexity
"""

import math
from dataclasses import dataclass

from castbot.dialogue import DECODING_DEFAULTS, IGNORE_INDEX, DialogueFormat, Turn, decode_reply, sample_turns
from castbot.model_folder import load_tokenizer, load_weights, pick_device, read_card


MIN_TEMPERATURE = 0.01  # lower temperatures decode greedily


@dataclass
class Reply:
    reply: str
    prompt_tokens: int  # tokens of the prompt after dropping the oldest turns
    new_tokens: int  # tokens generated, including the end-of-turn token
    hit_max_tokens: bool  # stopped by max_new_tokens, not by an end-of-turn token


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

    def __init__(self, tokenizer, model, fmt: DialogueFormat, max_length: int | None = None):
        self.tokenizer, self.model, self.format = tokenizer, model, fmt
        self.positions = position_limit(model.config)
        # the prompt budget is the length the model was trained on, not its position table (8k for SmolLM2)
        self.max_length = min(max_length or self.positions, self.positions)

    @classmethod
    def load(cls, folder: str, fmt: DialogueFormat | None = None, device: str | None = None,
             torch_threads: int = 0, max_length: int | None = None, dtype: str = "auto") -> "Bot":
        """Load a model folder; its castbot.json gives the format and trained length unless fmt is given.
        dtype as castbot.model_folder.pick_device's."""
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        card = read_card(folder)  # None for a plain base model: eos format, its position table as the budget
        fmt = fmt or (card.format if card else DialogueFormat())
        device, torch_dtype = pick_device(device, dtype)
        model = load_weights(folder, torch_dtype).to(device).eval()
        return cls(load_tokenizer(folder), model, fmt, max_length or (card.max_length if card else None))

    @property
    def device(self):
        return self.model.device

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed: at most the trained length, and prompt + reply within the position table."""
        return max(1, min(self.max_length, self.positions - max_new_tokens))

    def prompt(self, turns: list[Turn], max_new_tokens: int) -> list[int]:
        return self.format.prompt_ids(self.tokenizer, turns, self.prompt_budget(max_new_tokens))

    def stream(self, turns: list[Turn], stop=None, **decoding):
        """Yield the reply's text piece by piece as it is generated; the generator returns the whole Reply.
        Setting the threading.Event `stop` (a client that went away) ends generation at the next token."""
        import threading

        from transformers import StoppingCriteria, TextIteratorStreamer

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop is not None and stop.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        done: list = []

        def work():
            try:
                done.extend(self.generate([turns], streamer=streamer, stopping_criteria=[Stop()], **decoding))
            except BaseException as exc:  # surfaced below; the streamer must still end, or the reader waits forever
                done.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        yield from (piece for piece in streamer if piece)
        worker.join()
        if isinstance(done[0], BaseException):
            raise RuntimeError(f"generation failed: {done[0]}") from done[0]
        return done[0]

    def generate(self, conversations: list[list[Turn]], streamer=None, stopping_criteria=None,
                 **decoding) -> list[Reply]:
        """One reply per conversation, in one left-padded generate() call; decoding as DECODING_DEFAULTS.
        A transformers streamer (one conversation only) receives the tokens as they come."""
        import torch

        settings = {**DECODING_DEFAULTS, **decoding}
        max_new = settings["max_new_tokens"]
        rows = [self.prompt(turns, max_new) for turns in conversations]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask = (torch.tensor(t, device=self.device) for t in left_pad(rows, pad))  # (batch, width) each
        width = ids.shape[1]
        # below MIN_TEMPERATURE the logits / temperature overflow: such requests decode greedily
        sampling = ({"do_sample": True, "temperature": settings["temperature"], "top_p": settings["top_p"],
                     "top_k": settings["top_k"]} if settings["temperature"] >= MIN_TEMPERATURE else {"do_sample": False})
        with torch.inference_mode():
            out = self.model.generate(  # (batch, width) -> (batch, width + new)
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=1,  # never an empty turn
                no_repeat_ngram_size=settings["no_repeat_ngram_size"], pad_token_id=pad, eos_token_id=eos,
                streamer=streamer, stopping_criteria=stopping_criteria, **sampling)
        replies = []
        for row, prompt in zip(out[:, width:].tolist(), rows):
            ended = eos in row
            new = row[: row.index(eos) + 1] if ended else row
            replies.append(Reply(decode_reply(self.tokenizer, new), len(prompt), len(new), not ended))
        return replies

    def encode(self, sample: dict, max_length: int) -> dict:
        """A {context, speakers, response} sample as input_ids/attention_mask/labels, loss on the response."""
        return self.format.encode_sample(self.tokenizer, sample_turns(sample), sample["response"], max_length)

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

            def pad(key, value):
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
