"""No password from a URL reaches the training run's MLflow params, its config.yaml or a log line."""

import hashlib
import json
import logging

import pytest
import yaml

from tasks.data.feedback import FeedbackFound, add_approved_feedback
from tasks.release.registry import flat_params, shown_settings
from tests.conftest import tiny_config

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Pa55"
URL = f"postgresql+psycopg://castbot:{SECRET}@db.internal:5432/chat"


def test_a_password_in_the_feedback_url_is_masked_in_params_and_config_yaml(tiny_show):
    config = tiny_config(tiny_show, **{"data.feedback": {"enabled": True, "url": URL}})
    params = flat_params(config)
    assert params["data.feedback.url"] == "postgresql+psycopg://castbot:***@db.internal:5432/chat"
    assert SECRET not in str(params) and SECRET not in yaml.safe_dump(shown_settings(config))  # config.yaml
    assert config.data.feedback.url == URL  # the flow still reads the log with the real one
    libpq = tiny_config(tiny_show, **{"data.feedback": {"url": f"host=db user=castbot password={SECRET}"}})
    assert flat_params(libpq)["data.feedback.url"] == "host=db user=castbot password=***"


def test_settings_without_a_password_are_shown_and_hashed_as_before(tiny_show):
    for feedback in ({}, {"enabled": True, "url": "postgresql+psycopg://castbot@db.internal/chat"},
                     {"enabled": True, "url": "sqlite:////var/castbot/chatlog.db"}):
        config = tiny_config(tiny_show, **{"data.feedback": feedback})
        assert shown_settings(config) == config.run_settings()
    with_password = tiny_config(tiny_show, **{"data.feedback": {"url": URL}})
    assert with_password.digest() != tiny_config(tiny_show).digest()  # a change of log is still a change


def test_the_feedback_log_line_names_the_log_without_its_password(tiny_show, caplog):
    config = tiny_config(tiny_show, **{"data.feedback": {"enabled": True, "url": URL}})
    splits = {"train": [{"episode": "E1", "context": ["Go?"], "response": "Yes."}], "validation": [], "test": []}
    caplog.set_level(logging.INFO, logger="castbot.feedback")
    add_approved_feedback.fn(splits, config, FeedbackFound(pending=2))
    [line] = [record.getMessage() for record in caplog.records if record.name == "castbot.feedback"]
    assert "from postgresql+psycopg://castbot:***@db.internal:5432/chat" in line and SECRET not in line
    assert "0 feedback samples added to training, 2 liked turns await review" in line


def test_the_published_digest_does_not_hash_the_password(tiny_show):
    """castbot.config_sha256 is an MLflow tag beside the masked params: a hash of the real settings would let anyone
    who reads both try passwords offline. It hashes what MLflow shows, so the password changes nothing in it."""
    config = tiny_config(tiny_show, **{"data.feedback": {"enabled": True, "url": URL}})
    other_password = tiny_config(tiny_show, **{"data.feedback": {"enabled": True, "url": URL.replace(SECRET, "x")}})
    assert config.digest() == other_password.digest()
    in_clear = hashlib.sha256(json.dumps(config.run_settings(), sort_keys=True).encode()).hexdigest()
    assert config.digest() != in_clear  # what a guess at the password would be checked against
    assert config.digest() == hashlib.sha256(json.dumps(shown_settings(config), sort_keys=True).encode()).hexdigest()
    other_host = tiny_config(tiny_show, **{"data.feedback": {"enabled": True, "url": URL.replace("db.", "db2.")}})
    assert other_host.digest() != config.digest()  # another log is still another training input
