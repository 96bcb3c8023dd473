"""Entry points that survive a slow start of Prefect's temporary server (a busy machine, a fresh database).

Prefect 3.8 waits PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 20) for the temporary server of a
process with no PREFECT_API_URL, counting only its 0.1 s sleeps between health checks
(prefect/server/api/server.py: SubprocessASGIServer.start). With both cores busy that is too short.
"""

import functools
import os
import sys
from collections.abc import Callable

STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 600  # generous: a fresh SQLite database on a saturated 2-core machine took over 20 s
PREFECT_TIMEOUT_TEXT = "Timed out while attempting to connect to ephemeral Prefect API server"


def allow_slow_server_start() -> None:
    """Raise Prefect's wait for its temporary server unless the user set it; call before Prefect reads settings."""
    os.environ.setdefault(STARTUP_TIMEOUT_SETTING, str(STARTUP_TIMEOUT_S))


def startup_timeout_message() -> str:
    """What a user reads when the temporary server still did not answer in time, and the two ways out."""
    waited = os.environ.get(STARTUP_TIMEOUT_SETTING, "20")
    return (f"castbot: Prefect's temporary server did not start within {waited} s (the machine is busy, or its "
            f"database is new). Set {STARTUP_TIMEOUT_SETTING} higher (e.g. {STARTUP_TIMEOUT_S * 2}), or start a "
            "persistent server (`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api.")


def exits_on_server_timeout(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wrap a flow's `main(argv) -> exit code`: a temporary-server timeout prints startup_timeout_message, exit 1."""
    @functools.wraps(main)
    def wrapped(argv: list[str]) -> int:
        try:
            return main(argv)
        except RuntimeError as exc:
            if PREFECT_TIMEOUT_TEXT not in str(exc):
                raise
            print(startup_timeout_message(), file=sys.stderr)
            return 1
    return wrapped
