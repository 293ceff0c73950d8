"""``python -m jaxvars.report --workdir=DIR``: rewrite DIR/report.md and its figures."""

import sys

from absl import app, flags

from jaxvars import locking
from jaxvars.errors import JaxvarsError
from jaxvars.report.writer import write_report

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "A workdir of python -m jaxvars.main (holds results.json).")
flags.mark_flag_as_required("workdir")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  held = None
  try:
    held = locking.lock_run(_WORKDIR.value, mode="report")  # Not while a run writes there.
    path = write_report(_WORKDIR.value)
  except JaxvarsError as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)
  finally:
    if held is not None:
      held.release()
  print(f"report written to {path}")


if __name__ == "__main__":
  app.run(main)
