"""The report of a run: ``report.md`` and PNG figures, side by side with the paper.

  python -m jaxvars.report --workdir=/tmp/jaxvars

(also ``python -m jaxvars.main ... --mode=report``, and written automatically at the end
of every training or evaluation run while ``config.eval.report`` is true).

Reads ``<workdir>/results.json`` and ``<workdir>/artifacts.npz`` and writes
``<workdir>/report.md`` and ``<workdir>/figures/*.png``: the Tables 2/3 layout with the
paper's Amazon Men numbers beside this run's, the eps sweep (Figure 6), detection by eps
(Table 4), detector distances (Figure 8), ROC (Figure 9), images (Figure 7), embeddings
(Figure 11) and the ablations (Table 5). Systems, attacks and conditions are whatever
results.json holds (:mod:`jaxvars.report.tables`); nothing is hard-coded to the paper's
three systems.
"""

from jaxvars.report.writer import FIGURES_DIR, REPORT_FILE, write_report

__all__ = ["FIGURES_DIR", "REPORT_FILE", "write_report"]
