"""Command-line entry point.

  python -m jaxvars.main --config=configs/joint.py:cpu --workdir=/tmp/jaxvars [--mode=train]

Flags: ``--config`` (an ml_collections config file; any field can be overridden,
e.g. ``--config.vbpr.factors=32``), ``--workdir`` (split, checkpoints,
results.json), ``--mode``: ``train`` (train, resuming from the latest
checkpoint, then evaluate), ``evaluate`` (restore the latest checkpoint and
recompute the metrics) or ``report`` (only rewrite ``report.md`` and its figures from
``results.json``; same as ``python -m jaxvars.report``). ``train`` and ``evaluate`` end
by writing the report too while ``config.eval.report`` is true. A config whose ``task`` is ``'pretrain'`` (configs/pretrain.py)
runs self-supervised pretraining of the backbone instead.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxvars.errors import JaxvarsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. "
                                          "configs/joint.py:cpu,hm.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the split, checkpoints and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "report"],
                          "train: train (resuming) and evaluate; evaluate: restore and evaluate; "
                          "report: write report.md and figures from results.json.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops the INFO chatter of Orbax and tfds (warnings and errors still show)."""

  def filter(self, record) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/etils/"))
    return record.levelno >= 30 or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxvars import report, run, run_pretrain  # Imported here so that --help is fast.
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if _CONFIG.value.get("task", "joint") == "pretrain":
      if _MODE.value != "train":
        raise JaxvarsError("configs/pretrain.py runs with --mode=train only (it evaluates "
                           "the backbone it trains)")
      run_pretrain.pretrain_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      if _MODE.value == "train":
        run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      elif _MODE.value == "evaluate":
        run.evaluate(_CONFIG.value, _WORKDIR.value)
      if _MODE.value == "report" or _CONFIG.value.eval.get("report", True):
        print(f"report written to {report.write_report(_WORKDIR.value)}")
  except JaxvarsError as e:
    logging.error("%s", e)
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
