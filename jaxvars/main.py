"""Command-line entry point.

  python -m jaxvars.main --config=configs/joint.py:cpu --workdir=/tmp/jaxvars [--mode=train]

Flags: ``--config`` (an ml_collections config file; any field can be overridden,
e.g. ``--config.recommender.factors=32``), ``--workdir`` (split, checkpoints,
results.json), ``--mode``: ``train`` (train, resuming from the latest
checkpoint, then evaluate), ``evaluate`` (restore the latest checkpoint and
recompute the metrics), ``report`` (only rewrite ``report.md`` and its figures from
``results.json``; same as ``python -m jaxvars.report``) or ``plan`` (compile, not run, the
run's steps and estimate its cost on this machine and on named accelerators:
:mod:`jaxvars.planner`, written to ``<workdir>/plan.json``). ``train`` and ``evaluate`` end
by writing the report too while ``config.eval.report`` is true. A config whose ``task`` is ``'pretrain'`` (configs/pretrain.py)
runs self-supervised pretraining of the backbone instead.
"""

import errno
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxvars import locking
from jaxvars.errors import JaxvarsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. "
                                          "configs/joint.py:cpu,hm.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the split, checkpoints and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "report", "plan"],
                          "train: train (resuming) and evaluate; evaluate: restore and evaluate; "
                          "report: write report.md and figures from results.json; plan: "
                          "compile (not run) the run's steps and estimate its cost "
                          "(jaxvars/planner.py), written to <workdir>/plan.json.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Several processes (multi-controller JAX): host:port of process "
    "0's coordinator, with --num_processes and --process_id. Not needed on a Cloud TPU pod "
    "slice or under SLURM / Open MPI, which jax.distributed.initialize() detects (docs/"
    "running.md, 'Several hosts').")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in [0, "
                                   "--num_processes) (with --coordinator_address).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "auto: call jax.distributed.initialize() "
    "when the flags above or the environment (TPU pod slice, SLURM, Open MPI, "
    "JAX_COORDINATOR_ADDRESS) ask for it; on: always; off: never.")
flags.mark_flags_as_required(["config", "workdir"])


_CONFIG_HINT = ("every field, its meaning and its allowed values are listed in configs/joint.py "
                "(one line each); presets are described at its top")


def _one_line(error: BaseException, argv) -> str:
  """A flag or config error as one line naming the flag, field or preset."""
  text = str(error).replace("\\n", " ").replace("\\'", "'").replace("\n", " ").strip()
  guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if guess or isinstance(error, (AttributeError, KeyError)):
    quoted = re.findall(r"'(\w+)'", text)
    key = guess.group(2) if guess else (quoted[0] if quoted else text)
    flag = next((a.split("=")[0] for a in argv
                 if key in a.split("=")[0].lstrip("-").split(".")), f"--config...{key}")
    return (f"{flag}: the config has no field {key!r}"
            + (f" (did you mean {guess.group(1)!r}?)" if guess else ""))
  if "[Errno" in text:  # A config file that cannot be read.
    return "--config: " + text[text.index("[Errno"):]
  errors = re.findall(r"(?:^|\s)\w*Error: (.*?)(?=\s\w*Error: |$)", text)
  return (errors[-1] if errors else text).strip()


def disk_full_message(e: OSError) -> str:
  """The one line for a write that failed for lack of space (ENOSPC, EDQUOT)."""
  where = f" writing {e.filename}" if e.filename else ""
  return (f"no space left on device{where} ({e.strerror or e}); results, records and "
          "checkpoints are written under temporary names and renamed only when complete, so "
          "none was left half-written: free some space and run the same command again to "
          "resume")


def parse_flags(argv):
  """absl's flag parsing, with config and preset errors as one line + a hint and exit code 2
  (``--verbosity=1`` or higher shows the traceback instead)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, AttributeError, TypeError, KeyError, OSError) as e:
    if any(re.match(r"--?(verbosity|v)=?[1-9]", a) for a in argv):
      raise
    print(f"jaxvars: error: {_one_line(e, argv)}\n  hint: {_CONFIG_HINT}", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries:
  """Drops the INFO chatter of Orbax and tfds (warnings and errors still show)."""

  def filter(self, record) -> bool:
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/etils/"))
    return record.levelno >= 30 or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxvars import distributed
  try:  # First: before anything starts a JAX backend (loading the config may).
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           mode=_DISTRIBUTED.value)
  except ValueError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)
  try:  # A config file that failed to load raises on first use, not while parsing flags.
    task = _CONFIG.value.get("task", "joint")
  except OSError as e:
    print(f"jaxvars: error: {_one_line(e, sys.argv)}\n  hint: {_CONFIG_HINT}", file=sys.stderr)
    sys.exit(2)
  from jaxvars import report, run, run_pretrain  # Imported here so that --help is fast.
  # Process 0 logs the run; the others only their warnings and errors.
  logging.set_verbosity(logging.INFO if distributed.is_main() else logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  held = None  # The workdir's lock (jaxvars.locking), for the whole run.
  if _MODE.value == "plan":
    _plan()
    return
  try:
    if distributed.is_main():  # Process 0 holds the workdir for all of them.
      held = locking.lock_run(_WORKDIR.value, _CONFIG.value, mode=_MODE.value)
    if task == "pretrain":
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
        path = report.write_report(_WORKDIR.value)
        if distributed.is_main():
          print(f"report written to {path}")
  except JaxvarsError as e:
    logging.error("%s", e)
    print(f"jaxvars: error: {e}", file=sys.stderr)
    _exit(2)
  except OSError as e:  # A full disk under a writer other than jaxvars.atomic (Orbax, tfds).
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    print(f"jaxvars: error: {disk_full_message(e)}", file=sys.stderr)
    _exit(2)
  finally:
    if held is not None:
      held.release()


def _exit(code: int) -> None:
  """Exits with ``code``. In a run of several processes, at once (``os._exit``): the others
  then stop on the lost coordinator instead of waiting minutes at JAX's shutdown barrier
  for a process that left early."""
  import jax
  if jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.flush()
    os._exit(code)
  sys.exit(code)


def _plan() -> None:
  """``--mode=plan``: :func:`jaxvars.planner.plan_and_estimate` on every accelerator,
  printed and written to ``<workdir>/plan.json`` (nothing else is read or written there)."""
  from jaxvars import atomic, fs, planner
  try:
    result = planner.plan_and_estimate(_CONFIG.value)
    print(result["text"])
    fs.makedirs(_WORKDIR.value, exist_ok=True)
    path = fs.join(_WORKDIR.value, "plan.json")
    atomic.write_json(path, {k: v for k, v in result.items() if k != "text"})
    print(f"\nplan written to {path}")
  except JaxvarsError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
