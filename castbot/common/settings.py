"""Where castbot keeps its state: one project-local folder unless the environment says otherwise."""

import os
from pathlib import Path

STATE_DIR = Path(os.environ.get("CASTBOT_HOME", Path(__file__).resolve().parents[2] / ".castbot"))


def use_project_state() -> Path:
    """Point MLflow, Prefect and BentoML at STATE_DIR unless already configured; turn telemetry off."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{STATE_DIR / 'mlflow.db'}")
    os.environ.setdefault("PREFECT_HOME", str(STATE_DIR / "prefect"))
    os.environ.setdefault("BENTOML_HOME", str(STATE_DIR / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return STATE_DIR


def artifact_root() -> str:
    """Where MLflow experiments created by castbot store artifacts (beside the SQLite file)."""
    return (STATE_DIR / "mlartifacts").as_uri()
