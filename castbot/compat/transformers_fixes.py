"""Overrides of private transformers methods, each in one place with the version and the upstream behaviour.

transformers has no public hook for these; a rename or signature change upstream would silently bypass them
(the override is simply never called). tests/compat/test_transformers_fixes.py checks each method's name and
signature: when transformers changes, that test fails and the override is revisited here.

Written against transformers 5.24. No transformers import at module level: `TrainerHooks` is a mixin placed
before `transformers.Trainer` (`class MyTrainer(TrainerHooks, Trainer)`), so importing this module stays cheap.
Other private-API workarounds (castbot/engine.py's generation patch) belong here too.
"""

import inspect

# method name -> the parameters (after self) the override relies on, as transformers 5.24 declares them
TRAINER_PRIVATE = {
    "_get_train_sampler": ("train_dataset",),
    "_save_checkpoint": ("model", "trial"),
    "_load_best_model": (),
}


class TrainerHooks:
    """Public hooks in place of private Trainer methods: a custom training sampler, and a timer around the
    checkpoint saves and the best-model reload (subclasses override `train_sampler` and `time_aside`)."""

    def train_sampler(self, dataset):
        """The training sampler to use instead of Trainer's, or None to keep Trainer's."""
        return None

    def time_aside(self, method, *args, **kwargs):
        """Run a step that is not training (saving, reloading); subclasses time it."""
        return method(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """transformers 5.24: `Trainer._get_train_sampler(train_dataset=None)` gives the training DataLoader's
        sampler (RandomSampler, or LengthGroupedSampler under train_sampling_strategy="group_by_length")."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return self.train_sampler(dataset) or super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        """transformers 5.24: `Trainer._save_checkpoint(model, trial)` writes checkpoint-N (weights, optimizer,
        scheduler, RNG, trainer_state.json last) every save_steps; it runs inside the training loop."""
        return self.time_aside(super()._save_checkpoint, model, trial)

    def _load_best_model(self):
        """transformers 5.24: `Trainer._load_best_model()` reloads the best checkpoint's weights at the end of
        train() when load_best_model_at_end is set."""
        return self.time_aside(super()._load_best_model)


def trainer_private_changes() -> list[str]:
    """What no longer matches TRAINER_PRIVATE in the installed transformers (empty while the overrides hold)."""
    from transformers import Trainer

    problems = []
    for name, params in TRAINER_PRIVATE.items():
        method = getattr(Trainer, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        actual = tuple(inspect.signature(method).parameters)[1:]
        if actual != params:
            problems.append(f"Trainer.{name}{actual} is not {params}")
    return problems
