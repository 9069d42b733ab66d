"""The paper's result tables (Liu, Ye et al. 2020, Tables 1-3), as data.

Copied by hand from the paper so that the report never reads files outside the
repository at run time. ASR = attack success rate, as a fraction. Each row:
(model, parameter, asr_without_defense, asr_with_defense); the parameter is
theta for JSMA and the number of perturbed pixels for the One Pixel Attack.
Paper setup for comparison: 500 test images (JSMA, targeted one-pixel) or 100
images x every wrong label (untargeted one-pixel), the full CIFAR-10 training set,
their own trained models (accuracies in ``PAPER_MODEL_ACCURACY`` where known).
"""

from __future__ import annotations

TABLE1_JSMA: tuple[tuple[str, float, float, float], ...] = (
    ("cnn", 0.1, 0.554, 0.374),
    ("cnn", 0.2, 0.586, 0.368),
    ("cnn", 0.3, 0.602, 0.374),
    ("cnn", 0.4, 0.62, 0.376),
    ("lenet", 0.1, 0.716, 0.498),
    ("lenet", 0.2, 0.738, 0.49),
    ("lenet", 0.3, 0.74, 0.504),
    ("lenet", 0.4, 0.78, 0.502),
    ("resnet", 0.1, 0.37, 0.232),
    ("resnet", 0.2, 0.374, 0.224),
    ("resnet", 0.3, 0.376, 0.228),
    ("resnet", 0.4, 0.38, 0.228),
)

TABLE2_ONEPIXEL_TARGETED: tuple[tuple[str, int, float, float], ...] = (
    ("lenet", 1, 0.15, 0.12),
    ("lenet", 3, 0.59, 0.15),
    ("lenet", 5, 0.56, 0.18),
    ("pure_cnn", 1, 0.07, 0.03),
    ("pure_cnn", 3, 0.17, 0.05),
    ("pure_cnn", 5, 0.21, 0.06),
    ("net_in_net", 1, 0.03, 0.04),
    ("net_in_net", 3, 0.32, 0.06),
    ("net_in_net", 5, 0.39, 0.10),
    ("resnet", 1, 0.12, 0.04),
    ("resnet", 3, 0.33, 0.07),
    ("resnet", 5, 0.34, 0.10),
    ("densenet", 1, 0.03, 0.00),
    ("densenet", 3, 0.24, 0.04),
    ("densenet", 5, 0.30, 0.04),
    ("wide_resnet", 1, 0.01, 0.03),
    ("wide_resnet", 3, 0.19, 0.04),
    ("wide_resnet", 5, 0.22, 0.06),
)

TABLE3_ONEPIXEL_UNTARGETED: tuple[tuple[str, int, float, float], ...] = (
    ("lenet", 1, 0.63, 0.212),
    ("lenet", 3, 0.92, 0.328),
    ("lenet", 5, 0.93, 0.416),
    ("pure_cnn", 1, 0.13, 0.064),
    ("pure_cnn", 3, 0.58, 0.092),
    ("pure_cnn", 5, 0.63, 0.116),
    ("net_in_net", 1, 0.34, 0.066),
    ("net_in_net", 3, 0.73, 0.102),
    ("net_in_net", 5, 0.73, 0.134),
    ("resnet", 1, 0.34, 0.072),
    ("resnet", 3, 0.79, 0.124),
    ("resnet", 5, 0.79, 0.16),
    ("densenet", 1, 0.31, 0.052),
    ("densenet", 3, 0.71, 0.092),
    ("densenet", 5, 0.69, 0.132),
    ("wide_resnet", 1, 0.19, 0.052),
    ("wide_resnet", 3, 0.58, 0.092),
    ("wide_resnet", 5, 0.65, 0.132),
)

# Test accuracy of the one-pixel-attack model zoo the paper attacked (reported by
# that study); the paper gives none for its own cnn.
PAPER_MODEL_ACCURACY: dict[str, float] = {
    "lenet": 0.749, "pure_cnn": 0.888, "net_in_net": 0.908,
    "resnet": 0.923, "densenet": 0.947, "wide_resnet": 0.953,
}

TABLES = {
    "jsma": ("theta", TABLE1_JSMA),
    "onepixel_targeted": ("pixels", TABLE2_ONEPIXEL_TARGETED),
    "onepixel_untargeted": ("pixels", TABLE3_ONEPIXEL_UNTARGETED),
}

TITLES = {
    "jsma": "Table 1: JSMA",
    "onepixel_targeted": "Table 2: One Pixel Attack, targeted",
    "onepixel_untargeted": "Table 3: One Pixel Attack, untargeted",
}


def rows(section: str) -> list[dict]:
    param, table = TABLES[section]
    return [{"model": m, param: p, "asr_without_defense": a, "asr_with_defense": b} for m, p, a, b in table]


def frame(section: str):
    """The table as a pandas DataFrame with the paper's column names."""
    import pandas as pd

    return pd.DataFrame(rows(section))
