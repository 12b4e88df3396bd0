"""A test hook that makes the training loss NaN at chosen steps, from outside rnngen's code.

``install("STEP[@RANK],...")`` wraps ``Trainer.compute_loss``: at each listed step (on every rank, or on RANK
only) the loss is multiplied by NaN once, as a diverging run's would be, so the roll-back can be tested.
"""

from __future__ import annotations

from typing import Any


def install(spec: str, setattr_: Any = setattr) -> None:
    """Wrap the language-model trainer's loss; ``setattr_`` may be pytest's ``monkeypatch.setattr``."""
    from rnngen.training import Trainer

    wanted = [item.strip().split("@") for item in spec.split(",") if item.strip()]
    original = Trainer.compute_loss

    def compute_loss(self: Trainer) -> Any:
        if not hasattr(self, "_nan_steps"):  # each listed step once per trainer: the retry after the roll-back passes
            self._nan_steps = {int(s[0]) for s in wanted if len(s) == 1 or int(s[1]) == self.dist.rank}
        loss = original(self)
        if self.pos.step in self._nan_steps:
            self._nan_steps.discard(self.pos.step)
            loss = loss * float("nan")
        return loss

    setattr_(Trainer, "compute_loss", compute_loss)
