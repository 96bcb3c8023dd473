"""Engines: how the service turns conversations into replies. Each engine is one object behind one interface
(castbot/serve/engines/base.py: Engine), chosen once by name (CASTBOT_SERVE_ENGINE, "auto" by default:
resolve_engine); a new engine is one module plus a line in ENGINES.

    engine = make_engine("continuous", bot, limits)
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)
    stream = engine.stream(turns, max_new_tokens=40)
    async for piece in stream: ...                 # then stream.reply, finish_reason "cancelled" if left early
"""

import importlib
import importlib.util
from collections.abc import Callable

from castbot.serve.engines.base import Engine, EngineBusy, EngineError, Stream

__all__ = ["ENGINES", "Engine", "EngineBusy", "EngineError", "Stream", "engine_class", "make_engine", "resolve_engine"]

# name -> "module:class"; imported only when chosen (torch and transformers are heavy)
ENGINES = {
    "continuous": "castbot.serve.engines.continuous:ContinuousEngine",  # transformers' continuous batching
    "adaptive": "castbot.serve.engines.adaptive:AdaptiveEngine",  # static left-padded batches of queued requests
    "openvino": "castbot.serve.engines.openvino:OpenVINOEngine",  # OpenVINO GenAI's continuous batching on CPU
}


def resolve_engine(name: str, folder: str, device: str) -> str:
    """The engine "auto" means for a model folder on a device: OpenVINO's on CPU when the Bento was built with
    its export (the fastest measured on CPU, bench/serve_throughput.py --engines), else transformers' continuous
    batching."""
    if name != "auto":
        return name
    from castbot.serve.engines.openvino import built_export

    on_cpu = device == "cpu"
    return "openvino" if on_cpu and built_export(folder) and importlib.util.find_spec("openvino_genai") \
        else "continuous"


def engine_class(name: str) -> type[Engine]:
    """The class ENGINES names, imported now; its needs_weights says how to load the Bot it is built on."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {sorted(ENGINES)} (CASTBOT_SERVE_ENGINE)")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, bot, limits, on_batch: Callable[[int], None] = lambda size: None) -> Engine:
    """The engine ENGINES names, built from the service's limits; on_batch(size) is called per static batch run."""
    return engine_class(name).from_limits(bot, limits, on_batch)
