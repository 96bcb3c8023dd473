"""Every show profile in configs/ reads its real transcript and passes ingest, cleaning and both GX suites."""

import itertools
from pathlib import Path

import pytest

from tests.conftest import run_data_steps

pytestmark = pytest.mark.flow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHOWS = {  # profile -> (character, fewest training samples expected)
    "rick-and-morty.yaml": ("Rick", 1800),  # 415 of its own + 1,497 from the scrape's other episodes
    "rick-and-morty-scrape.yaml": ("Rick", 1500),
    "lotr.yaml": ("Frodo", 150),
    "friends.yaml": ("Rachel", 7000),
}


@pytest.mark.parametrize("profile", list(SHOWS))
def test_show_profile_data_steps_pass(profile, shared_data, tmp_path):
    from castbot.config.profile import load_profile

    config = load_profile(CONFIGS / profile)
    assert Path(config.data.path).resolve().is_relative_to(shared_data.resolve())  # also via a symlinked shared/
    character, fewest = SHOWS[profile]
    splits = run_data_steps(config, tmp_path / "docs")
    assert config.character == character and len(splits["train"]) >= fewest
    episodes = {name: {s["episode"] for s in samples} for name, samples in splits.items()}
    for a, b in itertools.combinations(episodes, 2):  # every pair: no episode in two splits
        assert not episodes[a] & episodes[b], f"{a} and {b} share episodes {episodes[a] & episodes[b]}"
    assert (tmp_path / "docs" / "dialogue" / "index.html").is_file()
