"""The base model: a Hugging Face id or folder, or 'offline-tiny' built here from the training text."""

import hashlib
import json
from pathlib import Path

from prefect import task

from castbot.config import OfflineModelConfig
from castbot.settings import STATE_DIR

OFFLINE = "offline-tiny"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def build_offline_model(texts: list[str], shape: OfflineModelConfig, seed: int, folder: Path) -> Path:
    """A byte-level BPE tokenizer trained on texts and a freshly initialised GPT-2, saved with save_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=shape.vocab_size, min_frequency=2, special_tokens=[EOS, PAD])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD, padding_side="left"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=shape.n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    tmp = folder.with_name(folder.name + ".partial")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.rename(folder)  # a crash mid-save never leaves a folder that looks complete
    return folder


@task(name="base-model")
def prepare_base_model(base_model: str, train_texts: list[str], shape: OfflineModelConfig, seed: int) -> str:
    """Return a name or folder that from_pretrained loads; offline-tiny is cached by content hash."""
    if base_model != OFFLINE:
        return base_model
    key = hashlib.sha256(json.dumps([train_texts, shape.model_dump(), seed]).encode()).hexdigest()[:16]
    folder = STATE_DIR / "base_models" / f"{OFFLINE}-{key}"
    if not folder.is_dir():
        build_offline_model(train_texts, shape, seed, folder)
    return str(folder)
