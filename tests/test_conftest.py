"""tests/conftest.py: one state folder per session."""

import os

import pytest

pytestmark = pytest.mark.unit


def test_conftest_is_imported_once_so_the_session_has_one_state_folder():
    import sys

    import tests.conftest

    assert "conftest" not in sys.modules or sys.modules["conftest"] is tests.conftest
    assert os.environ["CASTBOT_HOME"] == str(tests.conftest.STATE)
