"""tasks/data/dialogues.py: splits by episode, and a second transcript adds only its new episodes."""

import pytest

from tests.conftest import CHARACTER, tiny_show_rows

pytestmark = pytest.mark.unit


def test_splits_never_share_an_episode():
    import pandas as pd

    from castbot.config.data import DialogueConfig
    from tasks.data.dialogues import build_dialogues

    frame = pd.DataFrame(tiny_show_rows(episodes=10))
    splits = build_dialogues.fn(frame, CHARACTER, DialogueConfig(context_turns=2), seed=1)
    episodes = {name: {s["episode"] for s in samples} for name, samples in splits.items()}
    assert not episodes["train"] & episodes["test"] and not episodes["train"] & episodes["validation"]
    assert not episodes["validation"] & episodes["test"]
    seen = {(tuple(s["context"]), s["response"]) for s in splits["train"]}
    assert not any((tuple(s["context"]), s["response"]) in seen for s in splits["validation"] + splits["test"])
    n_lines = sum(1 for r in tiny_show_rows(episodes=10) if r["speaker"] == CHARACTER)
    assert len(splits["train"]) + len(splits["validation"]) + len(splits["test"]) <= n_lines
    assert splits["validation"] and splits["test"]
    # context comes from the same episode and scene, at most context_turns lines
    assert all(len(s["context"]) <= 2 for s in splits["train"])


def test_another_transcript_adds_only_its_new_episodes_to_training():
    """A second transcript of the show names episodes its own way; the episodes both hold are left out, and
    validation and test stay exactly the first transcript's."""
    import pandas as pd

    from castbot.config.data import DialogueConfig
    from tasks.data.dialogues import build_dialogues, new_episodes

    frame = pd.DataFrame(tiny_show_rows(episodes=10))
    copy = frame[frame["episode"].isin(["E3", "E7"])].assign(  # the same two episodes, scraped again
        episode=lambda f: f["episode"].map({"E3": "103", "E7": "107"}), line=lambda f: f["line"].str.upper())
    new = pd.DataFrame([{"episode": str(e), "scene": "0", "speaker": CHARACTER if i % 2 else "Bram",
                         "line": f"In episode {e} we have line number {i} of a brand new adventure"}
                        for e in (11, 12, 13, 14) for i in range(10)])
    quoted = max(frame["line"], key=len)  # one line in eleven quoted from the first transcript: still a new episode
    new = pd.concat([new, pd.DataFrame([{"episode": "11", "scene": "0", "speaker": "Bram", "line": quoted}])])
    other = pd.concat([copy, new])
    kept, repeated = new_episodes(other, frame)
    assert sorted(repeated) == ["103", "107"] and set(kept["episode"]) == {"11", "12", "13", "14"}

    config = DialogueConfig(context_turns=2)
    alone = build_dialogues.fn(frame, CHARACTER, config, seed=1)
    both = build_dialogues.fn(frame, CHARACTER, config, seed=1, more={"scrape": other})
    assert both["test"] == alone["test"] and both["validation"] == alone["validation"]
    added = both["train"][len(alone["train"]):]
    assert both["train"][:len(alone["train"])] == alone["train"]
    assert {s["episode"] for s in added} == {"scrape:11", "scrape:12", "scrape:13", "scrape:14"}
    assert len(added) == (new["speaker"] == CHARACTER).sum()
