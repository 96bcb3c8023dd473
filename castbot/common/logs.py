"""One logger helper for every task: Prefect's run logger inside a run, a plain logger elsewhere."""

import logging


def run_logger(name: str):
    """The Prefect run logger inside a flow or task, else logging.getLogger(name) (tests, bench, DDP ranks)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
