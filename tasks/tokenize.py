"""Tokenise dialogue samples into a datasets.DatasetDict with the shared dialogue format."""

from prefect import task

from castbot import dialogue
from castbot.config import DialogueConfig
from castbot.dialogue import encode_sample
from tasks.cache import announce_cache_hit, content_policy


def load_tokenizer(name_or_path: str):
    """The tokenizer with a pad token (DialoGPT has none: its eos doubles as pad)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_split(samples: list[dict], tokenizer, config: DialogueConfig):
    """A datasets.Dataset of input_ids / attention_mask / labels (labels -100 where no loss is taken)."""
    from datasets import Dataset

    def encode(batch):
        encoded = [
            encode_sample(tokenizer, context, response, config.max_length, config.loss_on)
            for context, response in zip(batch["context"], batch["response"])
        ]
        return {key: [e[key] for e in encoded] for key in ("input_ids", "attention_mask", "labels")}

    return Dataset.from_list(samples).map(encode, batched=True, remove_columns=["episode", "context", "response"])


# same samples + tokenizer folder + config + format code -> the stored datasets are reused
@task(name="tokenize", cache_policy=content_policy(__file__, dialogue.__file__), on_completion=[announce_cache_hit])
def tokenize_dialogues(splits: dict[str, list[dict]], tokenizer_path: str, config: DialogueConfig):
    """Every split tokenised with the base model's tokenizer."""
    from datasets import DatasetDict

    tokenizer = load_tokenizer(tokenizer_path)
    return DatasetDict({name: encode_split(samples, tokenizer, config) for name, samples in splits.items()})
