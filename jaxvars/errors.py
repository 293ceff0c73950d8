"""Exceptions that the command-line program reports as one clear message.

Every error raised for bad user input (a config value, a data file, a diverging
run) derives from :class:`JaxvarsError`; ``jaxvars.main`` prints its message and
exits with status 2 instead of a traceback.
"""


class JaxvarsError(Exception):
  """Base class of the errors reported to the user as a single message."""


class ConfigError(JaxvarsError, ValueError):
  """A config field has a value outside what it accepts."""


class DataError(JaxvarsError, ValueError):
  """A data file is missing, unreadable or lacks the expected columns."""


class NonFiniteLossError(JaxvarsError, FloatingPointError):
  """Training produced a NaN or infinite loss."""


class DivergingLossError(NonFiniteLossError):
  """Training produced a finite loss far above where the stage started (as good as infinite:
  :data:`jaxvars.training.common.DIVERGENCE_FACTOR`); handled like a non-finite one."""


class DiskFullError(JaxvarsError, OSError):
  """A write failed for lack of space (ENOSPC, EDQUOT); nothing was left half-written."""


class CheckpointError(JaxvarsError, RuntimeError):
  """No usable checkpoint where one is needed."""
