"""What every training loop shares."""

from __future__ import annotations

import numpy as np

from jaxvars.errors import NonFiniteLossError


def check_finite(losses, *, where: str, advice: str, latest_checkpoint) -> None:
  """Stops training at the first NaN or infinite loss.

  Args:
    losses: float [N], the losses of the steps since the last check.
    where: what was training (named in the message). advice: what to change.
    latest_checkpoint: the latest saved step (it stays valid), or None.

  Raises:
    NonFiniteLossError: naming the step, the value, the advice and the latest checkpoint.
  """
  losses = np.asarray(losses)
  if np.all(np.isfinite(losses)):
    return
  bad = int(np.argmin(np.isfinite(losses)))
  raise NonFiniteLossError(
      f"non-finite {where} loss ({losses[bad]}) at step {bad + 1} of {len(losses)}; {advice}; "
      f"training stopped; checkpoints saved before stay valid (latest: {latest_checkpoint}); "
      "no results were written")
