"""Content-hash caching for data tasks: same data + config + code -> the stored result is reused."""

import hashlib
import json
from pathlib import Path

from prefect.cache_policies import TASK_SOURCE, CachePolicy


def content_bytes(value) -> bytes:
    """Stable bytes for a task input: DataFrames by content, pydantic models by value, the rest as JSON."""
    import pandas as pd
    from pydantic import BaseModel

    if isinstance(value, pd.DataFrame):
        header = json.dumps([list(map(str, value.columns)), list(map(str, value.dtypes))]).encode()
        return header + pd.util.hash_pandas_object(value, index=True).values.tobytes()
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode()
    if isinstance(value, str) and Path(value).is_dir():  # a model folder: its files' names, sizes and times
        files = sorted(p for p in Path(value).rglob("*") if p.is_file())
        return json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]).encode()
    return json.dumps(value, sort_keys=True, default=str).encode()


def content_policy(*source_files: str) -> CachePolicy:
    """Key = hash of every input by content + the task's source + the given source files (helpers it calls)."""
    sources = [Path(f) for f in source_files]

    def key(_context, parameters: dict) -> str:
        digest = hashlib.sha256()
        for name in sorted(parameters):
            digest.update(name.encode() + b"\0" + content_bytes(parameters[name]))
        for source in sources:
            digest.update(source.read_bytes())
        return digest.hexdigest()

    return CachePolicy.from_cache_key_fn(key) + TASK_SOURCE


def announce_cache_hit(task, task_run, state) -> None:
    """on_completion hook: say in the run's log when a task's result came from the cache."""
    from prefect.logging.loggers import task_run_logger

    if state.name == "Cached":
        task_run_logger(task_run, task).info(
            "same data, config and code as an earlier run: reused its stored result instead of recomputing")
