"""castbot/compat/transformers_fixes.py sentinel: fails when transformers changes what an override relies on."""

import pytest

pytestmark = pytest.mark.unit


def test_transformers_private_trainer_methods_still_match_the_overrides():
    """When this fails, transformers renamed or changed a private Trainer method that
    castbot.compat.transformers_fixes.TrainerHooks overrides: the override would silently stop running."""
    from castbot.compat.transformers_fixes import trainer_private_changes

    assert trainer_private_changes() == []
