"""Where the continuous engine reaches into transformers' private continuous-batching API, each touch in one
named function with the version and what it relies on.

tests/release/test_bento_engines.py (test_transformers_still_*) checks each relied-on detail: when transformers changes,
that test fails here, naming the function to fix, instead of the engine failing at serve time. (Trainer overrides have
their own compat module; this one is the engine's only.)
"""

import math


def never_empty_processor(eos_token_id: int):
    """A per-request logits processor that bans end-of-turn as a reply's first token, as generate()'s
    min_new_tokens=1 does (transformers 5.23-5.24 drops MinNewTokensLengthLogitsProcessor from continuous batching:
    its supports_continuous_batching is False). Its argument per request is 1 while nothing is generated yet.
    Relies on ContinuousBatchingLogitsProcessor's fill_defaults / prepare_tensor_args / __call__ protocol and on
    request.state.generated_tokens."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

    class NeverEmpty(ContinuousBatchingLogitsProcessor):
        supported_kwargs: dict[str, type] = {}
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
            return torch.tensor([not r.state.generated_tokens for r in requests_with_new_token], dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            first = tensor_arg[: scores.size(0)].bool()  # (requests,)
            banned = torch.zeros_like(scores, dtype=torch.bool)  # (requests, vocab)
            banned[:, eos_token_id] = first
            return scores.masked_fill(banned, -math.inf)

    return NeverEmpty()


def add_first_processor(manager, processor) -> None:
    """Put a per-request processor first in a ContinuousBatchingManager's list (before its top-k/top-p, so a banned
    token is never the only one left), before manager.start() sizes the argument tensors.

    transformers 5.23-5.24 offers no public way: the manager's `logit_processor` (a
    ContinuousBatchingLogitsProcessorList) keeps the list in `logits_processor`, counts per-request argument tensors
    in `tensors_required` (read when the batch tensors are allocated) and skips all processing unless
    `do_processing`."""
    processors = manager.logit_processor
    processors.logits_processor.insert(0, processor)
    processors.tensors_required += 1
    processors.do_processing = True


def running_requests(manager) -> int:
    """Requests in the manager's batch now (transformers 5.23-5.24: batch_processor.scheduler.active_requests;
    batch_processor is None until the thread has built it)."""
    processor = manager.batch_processor
    return len(processor.scheduler.active_requests) if processor is not None else 0


def decoding_steps(manager) -> int:
    """Decoding steps the manager's thread has run (transformers 5.23-5.24: `current_batch`, set by that thread
    once it runs and counted up per step)."""
    return getattr(manager, "current_batch", 0)
