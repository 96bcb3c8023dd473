"""Held-out perplexity: exp(total token loss / total target tokens) over non-padding labels."""

import hashlib
import math

from prefect import task

from castbot.config import DialogueConfig
from castbot.dialogue import IGNORE_INDEX


def perplexity(model, dataset, pad_token_id: int, batch_size: int = 32) -> dict:
    """Sum token losses over every target token of dataset; a mean of per-batch means is wrong with padding."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            width = max(len(ids) for ids in rows["input_ids"])

            def pad(seqs, value):
                return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)

            input_ids, labels = pad(rows["input_ids"], pad_token_id), pad(rows["labels"], IGNORE_INDEX)
            logits = model(input_ids=input_ids, attention_mask=pad(rows["attention_mask"], 0)).logits.float()
            # (batch, seq, vocab) predicts token t+1 from position t
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            total_loss += loss.item()
            total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    if not total_tokens:
        return {"perplexity": math.nan, "tokens": 0, "loss": math.nan, "total_loss": 0.0}
    mean = total_loss / total_tokens
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": total_tokens, "loss": mean,
            "total_loss": total_loss}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and merges: equal fingerprints make per-token perplexities comparable."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


@task(name="measure-perplexity")
def measure_perplexity(model_path: str, samples: list[dict], dialogue: DialogueConfig) -> dict:
    """Perplexity of the model on the samples' responses, tokenised with the model's own tokenizer.

    Also per character (exp(total loss / response characters)), which compares models whose tokenizers differ.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.tokenize import encode_split, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    responses_only = dialogue.model_copy(update={"loss_on": "response"})
    result = perplexity(model, encode_split(samples, tokenizer, responses_only), tokenizer.pad_token_id)
    chars = sum(len(s["response"].strip()) + 1 for s in samples)  # + 1: the end-of-turn token
    mean_per_char = result["total_loss"] / max(chars, 1)
    result["char_perplexity"] = math.exp(mean_per_char) if result["tokens"] and mean_per_char < 700 else math.nan
    result["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return result
