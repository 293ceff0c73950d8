"""What every training loop shares."""

from __future__ import annotations

import numpy as np

from jaxvars.errors import DivergingLossError, NonFiniteLossError

# A loss above DIVERGENCE_FACTOR * max(|first loss|, 1) has diverged: training lowers its
# loss (BPR starts near ln 2 = 0.69 per triplet; the defence's losses are weighted means of
# squared errors, InfoNCE and BPR terms), so a thousandfold rise (or past 1000 for a loss that
# starts below 1) means the run has blown up (lr=1e12 takes BPR to 4.6e25 in an epoch).
DIVERGENCE_FACTOR = 1e3


def check_finite(losses, *, where: str, advice: str, latest_checkpoint,
                 reference: float | None = None) -> None:
  """Stops training at the first NaN or infinite loss, or (given ``reference``) the first
  one above ``DIVERGENCE_FACTOR * max(|reference|, 1)``.

  Args:
    losses: float [N], the losses of the steps since the last check.
    where: what was training (named in the message). advice: what to change.
    latest_checkpoint: the latest saved step (it stays valid), or None.
    reference: the loss the stage started from in this run (its first step's), or None
      for no divergence bound.

  Raises:
    NonFiniteLossError: naming the step, the value, the advice and the latest checkpoint.
    DivergingLossError: (a NonFiniteLossError) the same, for a loss above the bound.
  """
  losses = np.asarray(losses, np.float64).reshape(-1)
  after = (f"{advice}; training stopped; checkpoints saved before stay valid (latest: "
           f"{latest_checkpoint}); no results were written")
  if not np.all(np.isfinite(losses)):
    bad = int(np.argmin(np.isfinite(losses)))
    raise NonFiniteLossError(
        f"non-finite {where} loss ({losses[bad]}) at step {bad + 1} of {len(losses)}; {after}")
  if reference is None or not np.isfinite(reference):
    return
  bound = DIVERGENCE_FACTOR * max(abs(float(reference)), 1.0)
  if np.any(losses > bound):
    bad = int(np.argmax(losses > bound))
    raise DivergingLossError(
        f"diverging {where} loss ({losses[bad]:.4g}) at step {bad + 1} of {len(losses)}: above "
        f"{DIVERGENCE_FACTOR:g} x max(|first loss| {float(reference):.4g}, 1) = {bound:.4g} "
        f"(jaxvars.training.common.DIVERGENCE_FACTOR); {after}")
