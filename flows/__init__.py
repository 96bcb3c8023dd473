"""Prefect flows. Importing this package points MLflow, Prefect and BentoML at castbot's state folder
(environment variables already set win) before Prefect reads its settings."""

from castbot.settings import use_project_state

use_project_state()
