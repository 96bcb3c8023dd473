"""castbot/model/folder.py: the model card, the one owner of a trained folder's format."""

import pytest

pytestmark = pytest.mark.unit


def test_model_card_round_trips_and_refuses_unknown_or_missing_fields(tmp_path):
    import json

    import pydantic

    from castbot.model.dialogue import DialogueFormat
    from castbot.model.folder import CARD_FILE, ModelCard, read_card

    assert read_card(tmp_path) is None  # a plain base model folder
    card = ModelCard(format=DialogueFormat("chat", "Rick", "Rick and Morty"), max_length=96, base_model="smollm2-135m")
    card.save(tmp_path)
    assert read_card(tmp_path) == card
    assert json.loads((tmp_path / CARD_FILE).read_text())["base_model"] == "smollm2-135m"  # the on-disk key
    with pytest.raises(pydantic.ValidationError, match="base_model"):
        ModelCard(format=DialogueFormat(), max_length=96)
    with pytest.raises(pydantic.ValidationError, match="trained_on"):
        ModelCard(format=DialogueFormat(), max_length=96, base_model=None, trained_on="x")
    (tmp_path / CARD_FILE).write_text(json.dumps({"format": {}, "max_length": 96}))
    with pytest.raises(pydantic.ValidationError, match="base_model"):
        read_card(tmp_path)
