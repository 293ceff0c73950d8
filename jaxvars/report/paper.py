"""The paper's numbers (Amazon Men), shown beside a run's: arXiv 2306.07992, Tables 2, 4, 5.

Keys are this project's names: attack methods ('fgsm', 'pgd') and result-row names of
systems ('vbpr', 'amr', 'defended', 'defended_rand'). Metrics in the order of :data:`METRICS`.
"""

import math

METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")

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

# Tables 2 (Amazon Men) and 3 (Amazon Fashion), both blocks: dataset -> recommender family ->
# condition -> row ('undefended': the family itself; 'amr': AMR on it; 'defended': OURS;
# 'defended_rand': OURS-rand) -> METRICS. Read from the paper's text (../shared/papers/).
TABLES23 = {
    'Amazon Men': {
        'VBPR': {
            'clean': {
                'undefended': (0.3122, 0.4261, 0.5564, 0.1123, 0.1290, 0.1486),
                'amr': (0.3145, 0.4265, 0.5569, 0.1131, 0.1293, 0.1489),
                'defended': (0.3118, 0.4260, 0.5563, 0.1121, 0.1290, 0.1484),
                'defended_rand': (0.3112, 0.4257, 0.5556, 0.1117, 0.1286, 0.1480),
            },
            'fgsm': {
                'undefended': (0.0098, 0.0286, 0.2340, 0.0054, 0.0113, 0.0602),
                'amr': (0.0092, 0.0262, 0.2200, 0.0051, 0.0105, 0.0565),
                'defended': (0.2819, 0.4103, 0.5989, 0.1919, 0.2332, 0.2800),
                'defended_rand': (0.2799, 0.4090, 0.5993, 0.1881, 0.2295, 0.2775),
            },
            'pgd': {
                'undefended': (0.0000, 0.0000, 0.0018, 0.0000, 0.0000, 0.0004),
                'amr': (0.0000, 0.0000, 0.0019, 0.0000, 0.0000, 0.0005),
                'defended': (0.0315, 0.0892, 0.4055, 0.0165, 0.0346, 0.1112),
                'defended_rand': (0.1480, 0.2719, 0.5598, 0.0863, 0.1257, 0.1973),
            },
        },
        'DVBPR': {
            'clean': {
                'undefended': (0.3473, 0.4740, 0.6189, 0.1249, 0.1435, 0.1653),
                'amr': (0.3498, 0.4744, 0.6195, 0.1258, 0.1438, 0.1656),
                'defended': (0.3468, 0.4739, 0.6188, 0.1247, 0.1435, 0.1651),
                'defended_rand': (0.3462, 0.4735, 0.6180, 0.1242, 0.1430, 0.1646),
            },
            'fgsm': {
                'undefended': (0.0109, 0.0318, 0.2603, 0.0060, 0.0126, 0.0670),
                'amr': (0.0102, 0.0291, 0.2447, 0.0057, 0.0117, 0.0628),
                'defended': (0.3136, 0.4564, 0.6662, 0.2135, 0.2594, 0.3115),
                'defended_rand': (0.3113, 0.4550, 0.6666, 0.2092, 0.2553, 0.3087),
            },
            'pgd': {
                'undefended': (0.0000, 0.0000, 0.0020, 0.0000, 0.0000, 0.0004),
                'amr': (0.0000, 0.0000, 0.0021, 0.0000, 0.0000, 0.0006),
                'defended': (0.0350, 0.0992, 0.4511, 0.0184, 0.0385, 0.1237),
                'defended_rand': (0.1646, 0.3024, 0.6227, 0.0960, 0.1398, 0.2195),
            },
        },
    },
    'Amazon Fashion': {
        'VBPR': {
            'clean': {
                'undefended': (0.3387, 0.4677, 0.6058, 0.2328, 0.2745, 0.3094),
                'amr': (0.3389, 0.4680, 0.6061, 0.2338, 0.2754, 0.3104),
                'defended': (0.3376, 0.4675, 0.6058, 0.2326, 0.2744, 0.3093),
                'defended_rand': (0.3330, 0.4663, 0.6067, 0.2285, 0.2711, 0.3070),
            },
            'fgsm': {
                'undefended': (0.0026, 0.0116, 0.1854, 0.0014, 0.0042, 0.0453),
                'amr': (0.0026, 0.0110, 0.1747, 0.0014, 0.0040, 0.0427),
                'defended': (0.3045, 0.4412, 0.6019, 0.2035, 0.2477, 0.2881),
                'defended_rand': (0.2948, 0.4329, 0.6025, 0.1945, 0.2392, 0.2822),
            },
            'pgd': {
                'undefended': (0.0000, 0.0000, 0.0025, 0.0000, 0.0000, 0.0006),
                'amr': (0.0000, 0.0000, 0.0027, 0.0000, 0.0000, 0.0007),
                'defended': (0.0133, 0.0564, 0.3580, 0.0065, 0.0201, 0.0929),
                'defended_rand': (0.1269, 0.2653, 0.5564, 0.0700, 0.1144, 0.1866),
            },
        },
        'DVBPR': {
            'clean': {
                'undefended': (0.3768, 0.5202, 0.6739, 0.2590, 0.3053, 0.3442),
                'amr': (0.3770, 0.5206, 0.6742, 0.2601, 0.3063, 0.3453),
                'defended': (0.3755, 0.5200, 0.6739, 0.2587, 0.3052, 0.3440),
                'defended_rand': (0.3704, 0.5187, 0.6749, 0.2542, 0.3016, 0.3415),
            },
            'fgsm': {
                'undefended': (0.0029, 0.0129, 0.2062, 0.0016, 0.0047, 0.0504),
                'amr': (0.0029, 0.0122, 0.1943, 0.0016, 0.0044, 0.0475),
                'defended': (0.3387, 0.4908, 0.6695, 0.2264, 0.2755, 0.3205),
                'defended_rand': (0.3279, 0.4815, 0.6702, 0.2164, 0.2661, 0.3139),
            },
            'pgd': {
                'undefended': (0.0000, 0.0000, 0.0028, 0.0000, 0.0000, 0.0007),
                'amr': (0.0000, 0.0000, 0.0030, 0.0000, 0.0000, 0.0008),
                'defended': (0.0148, 0.0627, 0.3982, 0.0072, 0.0224, 0.1033),
                'defended_rand': (0.1412, 0.2951, 0.6189, 0.0779, 0.1273, 0.2076),
            },
        },
    },
}

# Table 2's VBPR block (Amazon Men) under this project's row names: condition -> system ->
# METRICS ('vbpr' the undefended recommender).
TABLE2 = {cond: {("vbpr" if k == "undefended" else k): v for k, v in rows.items()}
          for cond, rows in TABLES23["Amazon Men"]["VBPR"].items()}
