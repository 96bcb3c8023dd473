"""The configuration, one module per concern; import from the module that defines a name.

    base      Strict: the base of every model (pydantic only: the service imports it)
    data      where the transcript is, how it is validated, cleaned and cut into dialogue samples
    training  the offline stand-in model, LoRA adapters, the fine-tuning run
    release   evaluation, the promotion gate, the MLflow registry and Bento
    monitor   the monitor flow's thresholds
    search    the study's search space (tune:)
    profile   TrainRunConfig (what a training run reads, and its digest), PipelineConfig (the profile), load_profile

Nothing is imported here, so importing castbot.config.base loads pydantic and nothing else.
"""
