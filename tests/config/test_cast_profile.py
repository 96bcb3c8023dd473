"""castbot/config/profile.py: a cast profile names several characters instead of one; one-character profiles keep
their settings, digest and params."""

import textwrap

import pandas as pd
import pytest

from castbot.config.profile import ConfigError, characters, load_profile
from tests.conftest import tiny_show_rows

pytestmark = pytest.mark.unit


def profile(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text("data: {path: show.csv}\n" + textwrap.dedent(body))
    return load_profile(path)


CHAT = "offline_model: {architecture: llama}\n"


def test_a_cast_list_loads_with_its_name_and_its_first_member_answering(tmp_path):
    config = profile(tmp_path, "cast: [Rick, Morty, Summer]\nshow: Rick and Morty\n" + CHAT)
    assert characters(config) == ["Rick", "Morty", "Summer"] and config.character is None
    assert config.model_name == "rick-and-morty-cast-bot"
    assert profile(tmp_path, "cast: [Rick, Morty]\n" + CHAT).model_name == "rick-cast-bot"
    named = profile(tmp_path, "cast: [Rick, Morty]\nregistry: {model_name: family-bot}\n" + CHAT)
    assert named.model_name == "family-bot"
    assert config.run_settings()["cast"] == ["Rick", "Morty", "Summer"] and "character" not in config.run_settings()


@pytest.mark.parametrize("body, message", [
    ("character: Rick\ncast: [Rick, Morty]\n" + CHAT, "either character .* or cast .*, not both"),
    (CHAT, "either character"),
    ("cast: [Rick]\n" + CHAT, "at least two speakers"),
    ("cast: [Rick, Rick]\n" + CHAT, "names a speaker twice"),
    ("cast: {top: 3}\n" + CHAT, r"cast: \{top: N\} needs show or registry.model_name"),
    ("cast: {top: 1}\nshow: S\n" + CHAT, r"top: Input should be greater than or equal to 2"),
    ("cast: [Rick, Morty]\ndialogue: {format: eos}\n" + CHAT, "chat-template|chat template"),
    ("cast: [Rick, Morty]\n", "a cast needs the chat dialogue format"),  # offline-tiny's gpt2: no template
])
def test_a_bad_cast_is_refused_saying_how_to_fix_it(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        profile(tmp_path, body)


def test_the_eos_refusal_says_to_use_a_chat_template_base_model(tmp_path):
    from castbot.config.profile import check_cast_format

    with pytest.raises(ConfigError, match="use a base model with a chat template"):
        profile(tmp_path, "cast: [Rick, Morty]\ndialogue: {format: eos}\n" + CHAT)
    config = profile(tmp_path, "cast: [Rick, Morty]\nbase_model: some/hub-model\n")
    with pytest.raises(ConfigError, match="some/hub-model: a cast needs the chat dialogue format"):
        check_cast_format(config, "eos")  # auto resolved to eos: the model has no chat template
    check_cast_format(config, "chat")
    check_cast_format(profile(tmp_path, "character: Rick\n"), "eos")  # one character: eos as always


def test_top_n_is_resolved_against_the_cleaned_transcript(tmp_path):
    from castbot.common.errors import DataError

    frame = pd.DataFrame(tiny_show_rows())  # Ada 72 lines, Bram 36, Cleo 36
    frame = pd.concat([frame, pd.DataFrame([{"episode": "E1", "scene": "0", "speaker": "Dot", "line": "Hi."}] * 3)])
    config = profile(tmp_path, "cast: {top: 3, min_lines: 5}\nshow: Tiny\n" + CHAT)
    assert characters(config, frame) == ["Ada", "Bram", "Cleo"]
    assert characters(profile(tmp_path, "cast: {top: 2}\nshow: Tiny\n" + CHAT), frame)[0] == "Ada"
    with pytest.raises(ValueError, match="resolved against the cleaned transcript"):
        characters(config)
    few = profile(tmp_path, "cast: {top: 4, min_lines: 40}\nshow: Tiny\n" + CHAT)
    with pytest.raises(DataError, match=r"finds 1 speaker\(s\) with 40\+ lines .*Ada \(72\)"):
        characters(few, frame)


def test_a_one_character_profile_keeps_its_dump_digest_and_params(tmp_path):
    """No cast key appears in a one-character profile's settings, so its digest and MLflow params are unchanged."""
    import hashlib
    import json

    from tasks.release.registry import flat_params

    config = profile(tmp_path, "character: Rick\nshow: Rick and Morty\n")
    assert "cast" not in config.model_dump() and "cast" not in config.run_settings()
    assert config.model_name == "rick-bot"
    settings = config.model_dump(mode="json", exclude={"monitor", "tune"})  # as the digest was computed before
    assert config.digest() == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    assert not [key for key in flat_params(config) if key.startswith("cast")]


def test_also_train_on_needs_the_same_cast(tmp_path):
    (tmp_path / "other.yaml").write_text("data: {path: other.csv}\ncharacter: Rick\n")
    cast = tmp_path / "cast.yaml"
    cast.write_text("data: {path: show.csv, also_train_on: [other.yaml]}\ncast: [Rick, Morty]\n" + CHAT)
    with pytest.raises(ConfigError, match="names a profile of 'Rick', not 'the cast"):
        load_profile(cast)
