"""Test fixtures. Every test session gets its own castbot state folder (MLflow, Prefect, BentoML)."""

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports castbot, prefect, mlflow or bentoml: isolate all state in a temp folder.
STATE = Path(tempfile.mkdtemp(prefix="castbot-test-"))
os.environ.update({
    "CASTBOT_HOME": str(STATE),
    "MLFLOW_TRACKING_URI": f"sqlite:///{STATE / 'mlflow.db'}",
    "PREFECT_HOME": str(STATE / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(STATE / "prefect-results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "BENTOML_HOME": str(STATE / "bentoml"),
    "BENTOML_DO_NOT_TRACK": "True",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

CHARACTER = "Ada"
OTHERS = ["Bram", "Cleo"]
WORDS = ("the rocket needs fuel before we fly to the moon tonight and you know it "
         "science is never simple but the answer is always in the numbers").split()


def tiny_show_rows(episodes: int = 6, lines_per_episode: int = 24) -> list[dict]:
    """A made-up show: Ada answers Bram and Cleo; deterministic text with a little variety."""
    rows = []
    for e in range(episodes):
        for i in range(lines_per_episode):
            speaker = CHARACTER if i % 2 else OTHERS[(i // 2) % 2]
            words = [WORDS[(e * 7 + i * 3 + k) % len(WORDS)] for k in range(4 + (i % 5))]
            rows.append({"episode": f"E{e + 1}", "scene": str(i // 8), "speaker": speaker,
                         "line": " ".join(words).capitalize() + ("?" if speaker != CHARACTER else ".")})
    return rows


def write_tiny_show(path: Path, **kwargs) -> Path:
    import pandas as pd

    pd.DataFrame(tiny_show_rows(**kwargs)).to_csv(path, index=False)
    return path


def tiny_config(data_path, **overrides):
    """A pipeline config that trains a ~50k-parameter model for a few steps: seconds on CPU."""
    from castbot.config.profile import PipelineConfig

    raw = {
        "data": {"path": str(data_path), "columns": {"episode": "episode", "speaker": "speaker", "line": "line",
                                                     "scene": "scene"}},
        "character": CHARACTER,
        "offline_model": {"vocab_size": 300, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128},
        "validation": {"min_rows": 20, "min_character_lines": 10},
        "dialogue": {"context_turns": 3, "max_length": 48, "val_fraction": 0.2, "test_fraction": 0.2},
        "training": {"max_steps": 12, "batch_size": 8, "eval_steps": 6, "save_steps": 6, "learning_rate": 0.005},
        "gate": {"max_perplexity": 1000},
        "registry": {"build_bento": False},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return PipelineConfig.model_validate(raw)


def cleaned_transcript(config, docs: Path):
    """ingest -> raw checks -> clean -> dialogue checks, as the flow runs them (task bodies only)."""
    from tasks.data.clean import clean_transcript
    from tasks.data.ingest import load_transcript
    from tasks.data.validate import validate_dialogue, validate_raw

    frame = load_transcript.fn(config.data)
    validate_raw.fn(frame, config.data.path, config.validation, str(docs))
    cleaned, _ = clean_transcript.fn(frame, config.cleaning)
    validate_dialogue.fn(cleaned, config.data.path, config.character, config.validation, str(docs))
    return cleaned


def run_data_steps(config, docs: Path):
    """The data steps up to the samples, with the transcripts of data.also_train_on."""
    from castbot.config.profile import load_profile
    from tasks.data.dialogues import build_dialogues

    more = {Path(p).stem: cleaned_transcript(load_profile(p), docs / Path(p).stem) for p in config.data.also_train_on}
    return build_dialogues.fn(cleaned_transcript(config, docs), config.character, config.dialogue,
                              config.training.seed, more)


# Test tiers (markers registered in pyproject.toml): `make test-fast` runs the unit tier, `make test` all of them.
# Each test carries exactly one, from `pytestmark = pytest.mark.<tier>` at the top of its file or a decorator:
# unit: functions on small inputs and tiny models (seconds); flow: tasks and flows with real Prefect, GX, MLflow;
# service: a real `bentoml serve` over HTTP; slow: SmolLM2, servers, kills, a saturated CPU.
TIERS = ("unit", "flow", "service", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} has tier markers {tiers}: give it exactly one of {TIERS} "
                                    "(`pytestmark = pytest.mark.unit` at the top of its file, or a decorator)")


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's state folder (MLflow DB, BentoML store, Prefect DB) unless asked to keep it."""
    import shutil

    if not os.environ.get("CASTBOT_KEEP_TEST_STATE"):
        shutil.rmtree(STATE, ignore_errors=True)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_9_once(proc, ready, waiting_for: str, seconds: float = 300) -> None:
    """SIGKILL the process group of proc (started with start_new_session=True, stdout piped) as soon as ready()
    is true; fail saying what never came if proc ends first or `seconds` pass."""
    import signal
    import time

    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, f"it ended before {waiting_for}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {waiting_for} after {seconds:.0f} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def stop_process_group(proc, timeout: float = 20) -> None:
    """SIGTERM a process started with start_new_session=True and all its children; SIGKILL if they linger."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def tiny_show(tmp_path) -> Path:
    return write_tiny_show(tmp_path / "tiny_show.csv")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the real-transcript tests read ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
