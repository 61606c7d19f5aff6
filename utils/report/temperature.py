"""Calibrated patient probabilities by temperature scaling (Guo et al. 2017): p' = sigmoid(logit(p) / T)
with the one T that minimises the negative log-likelihood of the calibration patients.

A temperature keeps logit 0 at 0, so the decision at 0.5 and every ranking (AUC, conformal
sets) stay as they are; only how sure the probabilities sound changes. Inside the
cross-validation each outer fold's patients are scaled with a T fitted on the other folds'
out-of-fold patients of the same repeat (never their own). Reads frames only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

from utils.report.statistics import other_folds

EDGE = 1e-6  # probabilities are clipped this far from 0 and 1 before their logit


def _logits(prob) -> np.ndarray:
    return logit(np.clip(np.asarray(prob, float), EDGE, 1 - EDGE))


def fit_temperature(prob, labels) -> float:
    """The T > 0 of least negative log-likelihood, searched on log T in [-4, 4]; 1 where the
    patients hold one class only (nothing to fit)."""
    z, y = _logits(prob), np.asarray(labels, float)
    if len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        q = np.clip(expit(z / np.exp(log_t)), EDGE, 1 - EDGE)
        return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def scaled(prob, temperature: float) -> np.ndarray:
    return expit(_logits(prob) / temperature)


def cross_fitted(patients: pd.DataFrame) -> pd.Series:
    """Each patient row's probability scaled with the temperature of the other folds of its
    repeat. `patients`: patient-level out-of-fold rows (repeat, fold, label, prob)."""
    out = pd.Series(np.nan, index=patients.index)
    for test, cal in other_folds(patients):
        out[test.index] = scaled(test["prob"], fit_temperature(cal["prob"], cal["label"]))
    return out
