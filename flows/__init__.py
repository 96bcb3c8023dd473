"""Prefect flows. Importing this package points MLflow, Prefect and BentoML at castbot's state folder
(environment variables already set win) and gives Prefect's temporary server time to start on a busy machine,
before Prefect reads its settings. Each flow's `main` is wrapped in `exits_on_server_timeout`."""

from castbot.common.settings import use_project_state
from castbot.compat.prefect_start import allow_slow_server_start

use_project_state()
allow_slow_server_start()
