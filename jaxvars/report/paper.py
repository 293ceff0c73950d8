"""The paper's numbers (Amazon Men), shown beside a run's: arXiv 2306.07992, Tables 2, 4, 5.

Keys are this project's names: attack methods ('fgsm', 'pgd') and result-row names of
systems ('vbpr', 'amr', 'defended', 'defended_rand'). Metrics in the order of :data:`METRICS`.
"""

import math

METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")

# Table 2 (VBPR block): condition -> system -> METRICS.
TABLE2 = {
    "clean": {"vbpr": (0.3122, 0.4261, 0.5564, 0.1123, 0.1290, 0.1486),
              "amr": (0.3145, 0.4265, 0.5569, 0.1131, 0.1293, 0.1489),
              "defended": (0.3118, 0.4260, 0.5563, 0.1121, 0.1290, 0.1484),
              "defended_rand": (0.3112, 0.4257, 0.5556, 0.1117, 0.1286, 0.1480)},
    "fgsm": {"vbpr": (0.0098, 0.0286, 0.2340, 0.0054, 0.0113, 0.0602),
             "amr": (0.0092, 0.0262, 0.2200, 0.0051, 0.0105, 0.0565),
             "defended": (0.2819, 0.4103, 0.5989, 0.1919, 0.2332, 0.2800),
             "defended_rand": (0.2799, 0.4090, 0.5993, 0.1881, 0.2295, 0.2775)},
    "pgd": {"vbpr": (0.0000, 0.0000, 0.0018, 0.0000, 0.0000, 0.0004),
            "amr": (0.0000, 0.0000, 0.0019, 0.0000, 0.0000, 0.0005),
            "defended": (0.0315, 0.0892, 0.4055, 0.0165, 0.0346, 0.1112),
            "defended_rand": (0.1480, 0.2719, 0.5598, 0.0863, 0.1257, 0.1973)},
}
# Table 4 (OURS): detection accuracy by eps (1/255).
TABLE4 = {8: 0.8826, 16: 0.9461, 32: 0.9660, 64: 0.9406}
# Table 5 (PGD, with rand): detection accuracy, NDCG@10, HR@10.
TABLE5 = {"unmodified architecture": (0.9462, 0.1257, 0.2719),
          "remove detection & contrastive loss": (math.nan, 0.0768, 0.1661),
          "remove perceptual loss": (0.8521, 0.1031, 0.2230)}
ABLATION_NAMES = {"no_detector": "remove detection & contrastive loss",
                  "no_perceptual": "remove perceptual loss"}
# Labels of result rows when results.json has no 'systems' section (older runs).
DEFAULT_LABELS = {"vbpr": "VBPR", "amr": "AMR", "defended": "OURS", "defended_rand": "OURS-rand",
                  "mostpop": "MostPop"}

# Table 6 (Amazon Men, VBPR): mean average prediction shift by eps (4, 8, 16, 32), without and
# with the defence. Keys: (attack, defended).
TABLE6_EPS = (4, 8, 16, 32)
TABLE6 = {("AIP-INSA", False): (1.2434, 2.8743, 4.2543, 7.1267),
          ("AIP-INSA", True): (0.0231, 0.0832, 0.1217, 0.3221),
          ("AIP-EXPA", False): (1.1864, 2.8322, 5.2955, 8.0270),
          ("AIP-EXPA", True): (0.0220, 0.0712, 0.1204, 0.3045),
          ("TAaMR-FGSM", False): (2.5693, 3.9821, 6.3798, 10.5739),
          ("TAaMR-FGSM", True): (0.1203, 0.2237, 0.3276, 0.5378),
          ("TAaMR-PGD", False): (3.1293, 4.2398, 7.3749, 11.672),
          ("TAaMR-PGD", True): (0.2652, 0.4319, 0.9833, 1.5822)}
# Our attack names behind the paper's rows (AIP's INSA and EXPA optimise with Adam; ours with
# PGD in the same L-inf ball).
TABLE6_ATTACKS = {"AIP-INSA": "pgd-insa", "AIP-EXPA": "pgd-expa", "TAaMR-FGSM": "fgsm-taamr",
                  "TAaMR-PGD": "pgd-taamr"}
