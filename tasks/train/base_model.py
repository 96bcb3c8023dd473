"""The base model: 'smollm2-135m' (packaged, castbot/model/pretrained.py), a Hugging Face id or folder, or
'offline-tiny' built here from the training text."""

import hashlib
import json
from pathlib import Path

from prefect import task

from castbot.common.settings import STATE_DIR
from castbot.config.training import OfflineModelConfig

OFFLINE = "offline-tiny"
EOS, PAD = "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2 writes it: the llama variant of offline-tiny is SmolLM2's layout in miniature
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _offline_config(shape: OfflineModelConfig, tokenizer):
    """GPT-2 or Llama config of the offline model's shape."""
    from transformers import GPT2Config, LlamaConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if shape.architecture == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.n_embd, intermediate_size=4 * shape.n_embd,
                           num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                           max_position_embeddings=shape.n_positions, tie_word_embeddings=True, **ids)
    return GPT2Config(vocab_size=len(tokenizer), n_positions=shape.n_positions, n_embd=shape.n_embd,
                      n_layer=shape.n_layer, n_head=shape.n_head, **ids)


def build_offline_model(texts: list[str], shape: OfflineModelConfig, seed: int, folder: Path) -> Path:
    """A byte-level BPE tokenizer trained on texts and a freshly initialised GPT-2 or Llama, saved with
    save_pretrained (the llama variant ends turns with <|im_end|> and carries a ChatML chat template)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    chat = shape.architecture == "llama"
    specials = [EOS, PAD, IM_START, IM_END] if chat else [EOS, PAD]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=shape.vocab_size, min_frequency=2, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END if chat else EOS, bos_token=IM_START if chat else EOS,
        unk_token=EOS, pad_token=PAD, padding_side="left",
    )
    if chat:
        tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_offline_config(shape, tokenizer))
    tmp = folder.with_name(folder.name + ".partial")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.rename(folder)  # a crash mid-save never leaves a folder that looks complete
    return folder


def base_reference(base_model: str, resolved: str) -> str:
    """What a LoRA adapter records as its base: the packaged name or hub id, or offline-tiny's cached folder."""
    return resolved if base_model == OFFLINE else base_model


@task(name="prepare_base_model")
def prepare_base_model(base_model: str, train_texts: list[str], shape: OfflineModelConfig, seed: int) -> str:
    """Return a name or folder that from_pretrained loads; smollm2-135m and offline-tiny are cached by content hash."""
    from castbot.model.pretrained import resolve

    if base_model != OFFLINE:
        return resolve(base_model)
    key = hashlib.sha256(json.dumps([train_texts, shape.model_dump(), seed]).encode()).hexdigest()[:16]
    folder = STATE_DIR / "base_models" / f"{OFFLINE}-{key}"
    if not folder.is_dir():
        build_offline_model(train_texts, shape, seed, folder)
    return str(folder)
