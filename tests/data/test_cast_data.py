"""A cast's data: every member validated as one character is, samples naming their speaker in the chat format's
system line, and one episode split for the whole cast."""

import itertools

import pandas as pd
import pytest

from tests.conftest import CHARACTER, tiny_show_rows

CAST = ["Ada", "Bram", "Cleo"]


@pytest.mark.unit
def test_cast_samples_name_their_speaker_and_one_character_samples_stay_as_they_were():
    from castbot.config.data import DialogueConfig
    from tasks.data.dialogues import build_dialogues

    frame = pd.DataFrame(tiny_show_rows(episodes=10))
    config = DialogueConfig(context_turns=2)
    alone = build_dialogues.fn(frame, CHARACTER, config, seed=1)
    cast = build_dialogues.fn(frame, CAST, config, seed=1)
    assert not any("character" in s for split in alone.values() for s in split)  # resume keys, caches unchanged
    samples = [s for split in cast.values() for s in split]
    assert {s["character"] for s in samples} == set(CAST)
    assert sum(s["character"] == "Bram" for s in samples) == (frame["speaker"] == "Bram").sum()
    # the one character's samples are the same whether learnt alone or in the cast
    for name in alone:
        assert [{k: v for k, v in s.items() if k != "character"} for s in cast[name] if s["character"] == "Ada"] == \
            alone[name]


@pytest.mark.unit
def test_no_episode_is_in_two_splits_for_any_member():
    from castbot.config.data import DialogueConfig
    from tasks.data.dialogues import build_dialogues

    splits = build_dialogues.fn(pd.DataFrame(tiny_show_rows(episodes=10)), CAST, DialogueConfig(context_turns=2),
                                seed=3)
    episodes = {name: {s["episode"] for s in samples} for name, samples in splits.items()}
    for a, b in itertools.combinations(episodes, 2):
        assert not episodes[a] & episodes[b], f"{a} and {b} share {episodes[a] & episodes[b]}"
    for member in CAST:  # each member is held out on the same episodes as everyone
        test = {s["episode"] for s in splits["test"] if s["character"] == member}
        assert test and test <= episodes["test"]
        assert not test & {s["episode"] for s in splits["train"] if s["character"] == member}


@pytest.mark.unit
def test_a_member_with_no_lines_is_named():
    from castbot.common.errors import DataError
    from castbot.config.data import DialogueConfig
    from tasks.data.dialogues import build_dialogues

    with pytest.raises(DataError, match="character 'Dot' has no lines"):
        build_dialogues.fn(pd.DataFrame(tiny_show_rows()), ["Ada", "Dot"], DialogueConfig(), seed=1)


@pytest.mark.unit
def test_each_sample_is_encoded_with_its_speakers_system_line(tmp_path):
    """The chat format's system line names the sample's own speaker; training and evaluation encode alike."""
    from castbot.config.data import DialogueConfig
    from castbot.config.training import OfflineModelConfig
    from castbot.model.bot import Bot
    from castbot.model.dialogue import DialogueFormat
    from castbot.model.folder import load_tokenizer
    from tasks.data.tokenize import encode_split
    from tasks.train.base_model import build_offline_model

    rows = tiny_show_rows()
    shape = OfflineModelConfig(architecture="llama", vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    folder = build_offline_model([r["line"] for r in rows], shape, 0, tmp_path / "model")
    tokenizer = load_tokenizer(str(folder))
    fmt = DialogueFormat("chat", "Ada", "The Tiny Show")
    sample = {"episode": "E1", "context": ["Where to?"], "speakers": ["Ada"], "response": "The moon."}
    encoded = encode_split([sample, {**sample, "character": "Bram"}], tokenizer, DialogueConfig(max_length=96), fmt)
    as_ada, as_bram = (tokenizer.decode(ids) for ids in encoded["input_ids"])
    assert "You are Ada from The Tiny Show." in as_ada and "Bram" not in as_ada
    assert "You are Bram from The Tiny Show." in as_bram and "You are Ada" not in as_bram
    bot = Bot(tokenizer, None, fmt, 96, config=type("Config", (), {"n_positions": 128})())
    assert bot.encode({**sample, "character": "Bram"}, 96)["input_ids"] == encoded["input_ids"][1]
    assert bot.encode(sample, 96)["input_ids"] == encoded["input_ids"][0]


@pytest.mark.flow  # Great Expectations
def test_validation_checks_every_member_and_names_the_thin_one(tmp_path):
    from castbot.common.errors import DataError
    from castbot.config.data import ValidationConfig
    from tasks.data.validate import validate_dialogue

    frame = pd.DataFrame(tiny_show_rows())
    frame = pd.concat([frame, pd.DataFrame([{"episode": "E1", "scene": "0", "speaker": "Dottie", "line": "Hi."}] * 2)])
    rules = ValidationConfig(min_rows=20, min_character_lines=10)
    passed = validate_dialogue.fn(frame, "show.csv", CAST, rules, str(tmp_path / "ok"))
    assert passed["evaluated_expectations"] == 3 + 2 * len(CAST)  # the per-character checks once per member
    with pytest.raises(DataError) as refused:
        validate_dialogue.fn(frame, "show.csv", ["Ada", "Dottie", "Dot"], rules, str(tmp_path / "thin"))
    message = str(refused.value)
    assert 'speaker == "Dottie"' in message and 'speaker == "Dot"' in message and 'speaker == "Ada"' not in message
    assert "character 'Dottie' speaks 2 line(s)" in message and "character 'Dot' speaks 0 line(s)" in message
    assert "similar labels: ['Dottie']" in message  # the missing one's likely label


@pytest.mark.flow  # the real transcript, Great Expectations
def test_the_rick_and_morty_cast_profile_holds_out_rick_exactly_as_the_rick_profile(shared_data, tmp_path):
    """configs/rick-and-morty-cast.yaml: all four members validated and learnt, no episode in two splits, and Rick's
    test samples are the Rick profile's, so the two compare on the same held-out lines."""
    from collections import Counter
    from pathlib import Path

    from castbot.config.profile import characters, load_profile, speakers_of
    from tasks.data.clean import clean_transcript
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript
    from tasks.data.validate import validate_dialogue

    configs = Path(__file__).resolve().parents[2] / "configs"
    cast, rick = load_profile(configs / "rick-and-morty-cast.yaml"), load_profile(configs / "rick-and-morty.yaml")
    cleaned, _ = clean_transcript.fn(load_transcript.fn(cast.data), cast.cleaning)
    checked = validate_dialogue.fn(cleaned, cast.data.path, speakers_of(cast, cleaned), cast.validation, str(tmp_path))
    assert checked["evaluated_expectations"] == 3 + 2 * 4
    splits = build_dialogues.fn(cleaned, characters(cast), cast.dialogue, cast.training.seed)
    assert cast.model_name == "rick-and-morty-cast-bot"
    assert set(Counter(s["character"] for s in splits["train"])) == {"Rick", "Morty", "Summer", "Jerry"}
    episodes = {name: {s["episode"] for s in samples} for name, samples in splits.items()}
    for a, b in itertools.combinations(episodes, 2):
        assert not episodes[a] & episodes[b]
    alone = build_dialogues.fn(cleaned, "Rick", rick.dialogue, rick.training.seed)
    assert [{k: v for k, v in s.items() if k != "character"} for s in splits["test"] if s["character"] == "Rick"] \
        == alone["test"]
