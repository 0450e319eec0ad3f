"""Did the run learn? A run stuck at chance must say so, not report itself as normal.

Why: a model/optimizer pair that does not train (ViT with SGD at lr 0.1 stays at 10 % on
digits and diverges on CIFAR) used to finish FINISHED with ``best_val_acc=0.1000`` and no
word of warning, and a sweep's trials looked like bad hyperparameters rather than a broken
recipe. ``learning_problem`` looks at a finished history; the trainer logs its answer as a
warning and tags the MLflow run ``learning=<verdict>``.

Two verdicts, each judged on the whole run (the first with advice that fits the model and
optimizer that ran, ``learning_advice``):

* ``stuck_at_chance``: the best validation accuracy (training accuracy without a
  validation split) is within three binomial standard deviations of 1 / num_classes, the
  accuracy of guessing: indistinguishable from not having learned anything.
* ``loss_above_chance``: the last training loss is above ``LOSS_FACTOR`` x ln(num_classes),
  the cross-entropy of a uniform guess: the model is worse than guessing (lr too high,
  diverging) even if accuracy is not at chance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LOSS_FACTOR", "LearningProblem", "chance_band", "learning_advice",
           "learning_problem"]

#: The last training loss above this multiple of ln(num_classes) counts as "far above".
LOSS_FACTOR = 1.5


@dataclass(frozen=True)
class LearningProblem:
    """What is wrong: ``verdict`` is the MLflow tag value, ``message`` the warning."""

    verdict: str
    message: str


def chance_band(num_classes: int, num_samples: int) -> float:
    """The accuracy below which a classifier is indistinguishable from guessing:
    1/C + 3 standard deviations of a guesser's accuracy on ``num_samples`` images."""
    p = 1.0 / num_classes
    return p + 3.0 * math.sqrt(p * (1.0 - p) / max(num_samples, 1))


#: Models that want an adaptive optimizer (Adam) rather than SGD: transformers.
ADAPTIVE_MODELS = ("vit",)
GENERIC_ADVICE = "check optimizer.base and optimizer.lr, and trainer.epochs"


def _range_bounds(space: str | None) -> tuple[float, float] | None:
    """The smallest and largest number of a search-space string (``tag(log, interval(0.01,
    0.5))``, ``choice(1e-4, 1e-3)``)."""
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d*)?(?:e-?\d+)?", space or "")]
    return (min(numbers), max(numbers)) if len(numbers) >= 2 else None


def learning_advice(cfg: Any) -> str:
    """What to try when the run of ``cfg`` (a ``TrainConfig``) did not learn, for the model
    and optimizer it actually ran: a ViT on SGD wants Adam; an lr outside the usual range of
    its base optimizer (``study.spaces.lr``, the range sweeps use) is named with that range;
    sensible settings with few epochs want more epochs (a ResNet-20 on digits is at chance
    after 1 epoch at any lr)."""
    model, base = cfg.model.name, cfg.optimizer.base_name
    lr, epochs = cfg.optimizer.lr, cfg.trainer.epochs
    if model in ADAPTIVE_MODELS and base == "sgd":
        return (f"model={model} does not train with SGD (optimizer.base=sgd optimizer.lr={lr:g}): "
                "use optimizer.base=adam optimizer.lr=1e-3, the recipe model=vit brings "
                "(conf/model/optimizer/)")
    space = (getattr(cfg.study, "spaces", None) or {}).get("lr", {}).get(base)
    bounds = _range_bounds(space)
    if bounds is not None and not bounds[0] <= lr <= bounds[1]:
        side = "high" if lr > bounds[1] else "low"
        return (f"optimizer.lr={lr:g} is {side} for optimizer.base={base}: its usual range is "
                f"{space} (study.spaces.lr.{base})")
    return (f"optimizer.base={base} optimizer.lr={lr:g} is a usual setting for {model}, so "
            f"{epochs} epoch(s) are probably too few: raise trainer.epochs, or use a smaller "
            "model for a quick look (model=mlp learns digits in one epoch)")


def learning_problem(
    history: Sequence[Mapping[str, float]], num_classes: int, num_val: int, num_train: int,
    advice: str = GENERIC_ADVICE,
) -> LearningProblem | None:
    """A warning if the run in ``history`` (one dict of metrics per epoch) did not learn."""
    if not history or num_classes < 2:
        return None
    has_val = num_val > 0 and any("val_acc" in row for row in history)
    key, n = ("val_acc", num_val) if has_val else ("train_acc", num_train)
    accs = [row[key] for row in history if key in row and math.isfinite(row[key])]
    epochs = len(history)
    if accs:
        best, band = max(accs), chance_band(num_classes, n)
        if best <= band:
            return LearningProblem(
                "stuck_at_chance",
                f"the run did not learn: best {key} {best:.4f} after {epochs} epoch(s) is at "
                f"chance (1/{num_classes} = {1 / num_classes:.4f}; anything below {band:.4f} "
                f"on {n} images is indistinguishable from guessing): {advice}.",
            )
    loss = history[-1].get("train_loss", math.nan)
    limit = LOSS_FACTOR * math.log(num_classes)
    if math.isfinite(loss) and loss > limit:
        return LearningProblem(
            "loss_above_chance",
            f"the run is worse than guessing: final train_loss {loss:.4f} is far above "
            f"ln({num_classes}) = {math.log(num_classes):.4f}, the loss of a uniform guess "
            "(optimizer.lr too high or training diverging).",
        )
    return None
