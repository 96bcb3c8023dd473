"""A trained model folder, owned here: its card (castbot.json), its tokenizer, its weights, and the bf16 rule.

A folder is a save_pretrained causal LM (or, for LoRA, the adapters alone) plus castbot.json:

    {"format": {"style": "chat", "character": "Rick", "show": "..."},   # how to prompt it (castbot.model.dialogue)
     "max_length": 128,                                               # tokens of the longest training sample
     "base_model": "smollm2-135m",                                     # LoRA: the base the adapters apply to
     "cast": ["Rick", "Morty"]}                  # a cast model only: who it speaks as; format.character is the first

Training writes it (`ModelCard.save`), the service, MLflow pyfunc, Bento and evaluation read it (`read_card`);
`load_weights` merges a LoRA adapter into its base. A base model folder without castbot.json is still loadable.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from castbot.model.dialogue import DialogueFormat

CARD_FILE = "castbot.json"  # written beside a trained model's weights


class ModelCard(BaseModel):
    """What a trained model folder records beside its weights. Unknown or missing fields fail when the card is
    built or saved, not when the service reads it. Adding a field is one edit here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: DialogueFormat = Field(description="how turns become tokens: the service prompts as training did")
    max_length: int = Field(ge=1, description="tokens of the longest training sample: the service's prompt budget")
    base_model: str | None = Field(description="LoRA adapter: the base it applies to (a packaged name such as "
                                               "smollm2-135m, a hub id or a folder); None for a full model")
    cast: tuple[str, ...] | None = Field(
        None, min_length=2, exclude_if=lambda cast: cast is None,  # one-character cards stay as they were
        description="a cast model: every character it speaks as (prompt one with format.speaking(name)), the "
                    "first being format.character, the default; None (absent from the file): one character")

    @model_validator(mode="after")
    def _default_in_cast(self):
        if self.cast is not None and self.format.character != self.cast[0]:
            raise ValueError(f"format.character {self.format.character!r} must be the cast's first, {self.cast[0]!r}")
        return self

    def save(self, folder: str | Path) -> Path:
        """Write castbot.json into folder (validated again first, so a card never saves what read_card refuses)."""
        path = Path(folder) / CARD_FILE
        text = self.model_dump_json(indent=2)
        ModelCard.model_validate_json(text)
        path.write_text(text)
        return path


def read_card(folder: str | Path) -> ModelCard | None:
    """The card of a trained model folder, or None for a plain base model (no castbot.json)."""
    path = Path(folder) / CARD_FILE
    return ModelCard.model_validate_json(path.read_text()) if path.is_file() else None


def native_cpu_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). On this project's 2-core AMD EPYC,
    SmolLM2-sized matmuls ran 2.3-3x faster in bf16 than fp32 from 32 rows up, and bf16 autocast trained
    1.7-1.9x faster; without such support bf16 is emulated and slower."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_bf16(device: str) -> bool:
    """The one bf16 rule: a CUDA device that supports bf16, or a CPU that multiplies it natively."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return native_cpu_bf16()


def pick_device(requested: str | None = None, dtype: str = "auto"):
    """(device, torch dtype). dtype "auto": CUDA in bf16 (fp16 without bf16 support), CPU in fp32, so evaluation
    figures do not depend on which CPU ran them; "fast": as auto, but bf16 on a CPU that multiplies it natively
    (serving); or a torch dtype name."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in ("auto", "fast"):
        return device, getattr(torch, dtype)
    if device.startswith("cuda"):
        return device, torch.bfloat16 if native_bf16(device) else torch.float16
    return device, torch.bfloat16 if dtype == "fast" and native_bf16(device) else torch.float32


def pick_precision(requested: str) -> str:
    """Training autocast: auto is bf16 where native_bf16 holds, fp16 (with a loss scaler) on older GPUs, else fp32.

    Measured on this project's 2-core AVX512-BF16 CPU (bench/train_throughput.py, Rick and Morty, offline
    model): bf16 autocast trains 1.7-1.9x faster than fp32; test perplexity bf16/fp32 was 1.016 on the raw
    transcript and 0.73 on the cleaned one (runs diverge on 300 samples; bf16 was never worse by > 2%).
    """
    import torch

    if requested == "fp16" and not torch.cuda.is_available():
        raise ValueError("training.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if requested != "auto":
        return requested
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if native_bf16(device):
        return "bf16"
    return "fp16" if device == "cuda" else "fp32"  # without native bf16, CPU autocast emulates it and is slower


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """The tokenizer with a pad token (DialoGPT has none: its eos doubles as pad; SmolLM2's pad is its eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_weights(folder: str, dtype=None, **kwargs):
    """A causal LM from a save_pretrained folder or hub id; a castbot LoRA adapter folder is merged into its base.
    kwargs go to from_pretrained (training asks for attn_implementation="sdpa")."""
    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    from peft import PeftModel

    from castbot.model.pretrained import resolve

    card = read_card(folder)
    if card is None or not card.base_model:
        raise ValueError(f"{folder}: a LoRA adapter needs {CARD_FILE} naming its base_model; retrain or copy it back")
    base = AutoModelForCausalLM.from_pretrained(resolve(card.base_model), dtype=dtype, **kwargs)
    return PeftModel.from_pretrained(base, folder).merge_and_unload()  # W + (alpha/r) B A: a plain model again


def save_merged(source: Path, dest: Path) -> None:
    """A LoRA adapter folder merged into its base and saved as a plain model folder (its card names no base)."""
    load_weights(str(source)).save_pretrained(dest)
    load_tokenizer(str(source)).save_pretrained(dest)
    read_card(source).model_copy(update={"base_model": None}).save(dest)  # merged: no base to resolve any more
