"""Tokenise dialogue samples into a datasets.DatasetDict with the shared dialogue format."""

from prefect import task

from castbot.common.cache import announce_cache_hit, content_policy
from castbot.config.data import DialogueConfig
from castbot.model import dialogue
from castbot.model.dialogue import DialogueFormat, sample_turns
from castbot.model.folder import load_tokenizer


def choose_format(tokenizer_path: str, config: DialogueConfig, character: str, show: str | None) -> DialogueFormat:
    """The dialogue format for this base model (dialogue.format; auto: its chat template if it has one)."""
    try:
        return DialogueFormat.choose(load_tokenizer(tokenizer_path), config.format, character, show)
    except ValueError as exc:
        raise ValueError(f"{tokenizer_path}: {exc}") from None


class PreEncoded:
    """The tokenizer with every distinct turn encoded up front in one batch call; encode() looks turns up.

    A line recurs in up to context_turns + 1 samples, and one Rust batch call beats a Python call per turn
    (Friends: ~74k encode calls -> one batch of ~60k distinct lines).
    """

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id  # read once per turn: skip transformers' slow __getattr__
        unique = sorted({text.strip() for text in texts})
        backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer of a fast tokenizer
        if backend is not None:
            ids = [encoding.ids for encoding in backend.encode_batch(unique, add_special_tokens=False)]
        else:
            ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        self.known = dict(zip(unique, ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens and text in self.known:
            return list(self.known[text])
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def encode_split(samples: list[dict], tokenizer, config: DialogueConfig, fmt: DialogueFormat = DialogueFormat()):
    """A datasets.Dataset of input_ids / attention_mask / labels (labels -100 where no loss is taken)."""
    from datasets import Dataset

    tokenizer = PreEncoded(tokenizer, [turn for s in samples for turn in [*s["context"], s["response"]]])
    encoded = [fmt.speaking(s.get("character")).encode_sample(  # a cast's sample: its speaker's system line
        tokenizer, sample_turns(s), s["response"], config.max_length, config.loss_on) for s in samples]
    return Dataset.from_dict({key: [e[key] for e in encoded] for key in ("input_ids", "attention_mask", "labels")})


# same samples + tokenizer folder + config + format code -> the stored datasets are reused
@task(name="tokenize_dialogues", cache_policy=content_policy(__file__, dialogue.__file__),
      on_completion=[announce_cache_hit])
def tokenize_dialogues(splits: dict[str, list[dict]], tokenizer_path: str, config: DialogueConfig,
                       fmt: DialogueFormat = DialogueFormat()):
    """Every split tokenised with the base model's tokenizer in the chosen dialogue format."""
    from datasets import DatasetDict

    tokenizer = load_tokenizer(tokenizer_path)
    return DatasetDict({name: encode_split(samples, tokenizer, config, fmt) for name, samples in splits.items()})
