"""The release sections of a profile: how replies are judged, when a candidate is promoted, where it is registered."""

from typing import Literal

from pydantic import Field

from castbot.config.base import Strict


class EvaluationConfig(Strict):
    """How candidates are judged on what they say (tasks/evaluate/judge.py), beside perplexity."""

    replies: int = Field(32, ge=0, le=2000, description="Held-out test contexts each model answers (seeded choice; "
                         "0: judge perplexity only). Decoded with the service's defaults, in batches.")
    reference_model: str | None = Field(
        None, description="Model whose perplexity of a reply (given its context) measures fluency; default: the "
        "untuned base model. Word salad scores badly here whatever words it uses.",
    )
    seed: int = Field(0, description="Seed of the context choice and the sampled replies (the bootstrap intervals "
                      "use a fixed seed, so reruns compare).")


class GateConfig(Strict):
    max_perplexity: float = Field(1e6, gt=1, description="A candidate with a higher test perplexity is never promoted.")
    min_improvement: float = Field(
        0.01, ge=0, lt=1, description="Relative perplexity drop over the base model and the champion needed to "
        "promote (0.01 = 1%).",
    )
    noise_confidence: float = Field(
        0.95, ge=0, lt=1, description="Against the champion, the paired bootstrap interval (at this confidence) of "
        "the per-sample loss difference must lie below 0: better beyond the noise of a small test split. 0: off.",
    )
    min_likeness: float | None = Field(
        None, description="Least calibrated character likeness of the replies (0: like the other speakers, 1: like "
        "the character's real lines). None: not checked.",
    )
    likeness_tolerance: float = Field(
        0.1, ge=0, le=10, description="How much lower than the champion's the candidate's likeness may be.",
    )
    max_reply_perplexity: float | None = Field(
        None, gt=1, description="Largest perplexity of the replies under the reference model (fluency). "
        "None: not checked.",
    )
    max_repeat3_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies that repeat a word 3-gram.")
    max_echo_rate: float = Field(0.5, ge=0, le=1,
                                 description="Largest share of replies that copy the user's last turn.")
    max_empty_rate: float = Field(0.5, ge=0, le=1, description="Largest share of empty (no letter or digit) replies.")
    max_template_leak_rate: float = Field(
        0.1, ge=0, le=1,
        description="Largest share of replies holding template or role tokens (<|im_end|>, 'assistant').",
    )


class RegistryConfig(Strict):
    model_name: str | None = Field(None, description="Registered model name; default '<character>-bot'.")
    experiment: str = Field("castbot", description="MLflow experiment for training runs.")
    build_bento: bool = Field(True, description="Build a Bento when the gate promotes a model.")
    openvino: Literal["auto", "int8", "fp32", "off"] = Field(
        "auto", description="The Bento's model exported to OpenVINO when it is built, for the CPU engine (the "
        "default engine on CPU when present). auto: int8 weights when their test perplexity is within "
        "openvino_max_increase of the model's own, else fp32 (fp32 when the build has no test split); skipped, with a "
        "warning, when OpenVINO's exporter is not installed (make cpu-engines). int8/fp32: that export, or the build "
        "fails. off: none (the continuous engine serves).")
    openvino_max_increase: float = Field(
        0.01, ge=0, le=1, description="Largest relative rise of test perplexity int8 weights may cost under "
        "openvino: auto. Measured (demo, 93 test samples): fp32 IR -0.1 %, int8 +0.6 % against torch fp32.")
