"""Class-conditional (Mondrian) conformal prediction sets per patient: benign, malignant, or
both ("refer"), at an error rate alpha that holds for benign and for malignant patients apart.

The p-values come from crepes' ConformalClassifier fitted on precomputed non-conformity scores
(1 - the probability of a label) with the calibration patients' labels as Mondrian categories:
it takes scores and categories as they are, with no model to wrap, which is what out-of-fold
patient scores are. Inside the cross-validation each outer fold's test patients are calibrated
on the other folds' out-of-fold patients of the same repeat, never on themselves, so the
coverage the report shows is measured, not the guarantee restated. Reads frames only.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from utils.files import atomic_write_text
from utils.report.statistics import bootstrap_ci, clustered_wilson, other_folds
from utils.report.temperature import fit_temperature, scaled

CONFORMAL_ALPHAS = (0.05, 0.1, 0.2)  # the rates of the report's table; --conformal-alpha adds its own
# An empty set (neither label plausible at alpha) is referred, as "both" is.
SET_NAMES = {(False, False): "empty", (True, False): "benign", (False, True): "malignant", (True, True): "refer"}


def label_scores(prob) -> np.ndarray:
    """(n, 2) non-conformity of labelling each patient benign (column 0) or malignant (1)."""
    prob = np.asarray(prob, float)
    return np.stack([prob, 1 - prob], axis=1)


def p_values(cal_prob, cal_labels, test_prob) -> np.ndarray:
    """(n_test, 2) Mondrian p-values: label k of a test patient against the calibration
    patients of class k only (crepes, unsmoothed: (#{score >= s} + 1) / (n_k + 1))."""
    from crepes import ConformalClassifier

    cal_labels = np.asarray(cal_labels, int)
    cal = label_scores(cal_prob)[np.arange(len(cal_labels)), cal_labels]
    classifier = ConformalClassifier().fit(cal, bins=cal_labels)
    test = label_scores(test_prob)
    out = np.zeros_like(test)
    for k in (0, 1):
        if not (cal_labels == k).any():  # no calibration patient of this class: it cannot be ruled out
            out[:, k] = 1.0
            continue
        out[:, k] = classifier.predict_p(test[:, k:k + 1], bins=np.full(len(test), k), smoothing=False)[:, 0]
    return out


def prediction_sets(cal_prob, cal_labels, test_prob, alpha: float) -> np.ndarray:
    """(n_test, 2) booleans: label k is in a patient's set when its p-value exceeds alpha."""
    return p_values(cal_prob, cal_labels, test_prob) > alpha


def cross_fitted_p_values(patients: pd.DataFrame) -> pd.DataFrame:
    """Per (repeat, fold, patient) row: the p-values of both labels (p_benign, p_malignant) of
    each test patient, calibrated on the other folds' patients of its repeat; they do not
    depend on alpha, so every rate's sets come from one fit. `patients`: patient-level
    out-of-fold rows with repeat, fold, patient, group, label, prob."""
    parts = []
    for test, cal in other_folds(patients):
        p = p_values(cal["prob"], cal["label"], test["prob"])
        parts.append(test.assign(p_benign=p[:, 0], p_malignant=p[:, 1]))
    return pd.concat(parts, ignore_index=True)


def sets_at(scored: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """The rows of cross_fitted_p_values() with their sets at alpha: benign, malignant (the
    label is in the set) and set (its name)."""
    out = scored.assign(benign=scored["p_benign"] > alpha, malignant=scored["p_malignant"] > alpha)
    out["set"] = [SET_NAMES[(b, m)] for b, m in zip(out["benign"], out["malignant"])]
    return out


def cross_fitted_sets(patients: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Each test patient's set at alpha, calibrated on the other folds' patients of its repeat."""
    return sets_at(cross_fitted_p_values(patients), alpha)


def _covered(sets: pd.DataFrame) -> pd.Series:
    return np.where(sets["label"] == 1, sets["malignant"], sets["benign"]).astype(float)


def conformal_rows(name: str, scored: pd.DataFrame, alpha: float, n_boot: int, seed: int) -> dict:
    """Coverage per class (target 1 - alpha), share referred, and accuracy, sensitivity and
    specificity on the patients decided (a set of one label), each patient once with the share
    of its repeats; Wilson intervals at the slide groups' effective size, AUC-free.
    `scored`: cross_fitted_p_values() of the model's patients."""
    sets = sets_at(scored, alpha).assign(covered=lambda s: _covered(s))
    sets["referred"] = sets["set"].isin(["refer", "empty"]).astype(float)  # neither label alone: a pathologist's
    per_patient = sets.groupby("patient").agg(label=("label", "first"), group=("group", "first"),
                                              covered=("covered", "mean"), referred=("referred", "mean"))
    row = {"experiment": name, "alpha": alpha, "patients": len(per_patient)}
    for label, cls in ((0, "benign"), (1, "malignant")):
        part = per_patient[per_patient["label"] == label]
        row[f"coverage_{cls}"] = float(part["covered"].mean()) if len(part) else float("nan")
        row[f"coverage_{cls}_ci"] = clustered_wilson(part["covered"], part["group"])
    row["referred"] = float(per_patient["referred"].mean())
    row["referred_ci"] = clustered_wilson(per_patient["referred"], per_patient["group"])
    decided = sets[sets["set"].isin(["benign", "malignant"])]
    row["decided_tests"] = len(decided)
    if len(decided) and decided["label"].nunique() == 2:
        frame = decided.assign(prob=decided["malignant"].astype(float), threshold=0.5)
        ci = bootstrap_ci(frame, "patient", n_boot=n_boot, seed=seed)
        for metric in ("accuracy", "sensitivity", "specificity"):
            row[f"decided_{metric}"], low, high = ci[metric]
            row[f"decided_{metric}_ci"] = (low, high)
    return row


def _interval(value: float, ci) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def conformal_table(runs: dict, names, alphas, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per compared model and error rate: coverage per class, share referred, and the
    decided patients' accuracy, sensitivity and specificity, as 'value [95 % CI]'."""
    from utils.metrics import patient_probabilities

    rows = []
    for name in [n for n in names if n in runs]:
        patients = patient_probabilities(runs[name]["pooled"])
        if patients["label"].nunique() < 2:
            continue
        scored = cross_fitted_p_values(patients)
        for alpha in alphas:
            row = conformal_rows(name, scored, alpha, n_boot, seed)
            shown = {"experiment": name, "alpha": alpha, "target coverage": f"{1 - alpha:.2f}",
                     "patients": row["patients"]}
            for cls in ("benign", "malignant"):
                shown[f"coverage {cls}"] = _interval(row[f"coverage_{cls}"], row[f"coverage_{cls}_ci"])
            shown["referred"] = _interval(row["referred"], row["referred_ci"])
            for metric in ("accuracy", "sensitivity", "specificity"):
                shown[f"decided {metric}"] = _interval(row.get(f"decided_{metric}", float("nan")),
                                                       row.get(f"decided_{metric}_ci", (0, 0)))
            rows.append(shown)
    return pd.DataFrame(rows)


def referral_curve(patients: pd.DataFrame, alphas) -> np.ndarray:
    """Share of patient tests referred (a set of both labels, or none) at each alpha."""
    scored = cross_fitted_p_values(patients)
    return np.array([sets_at(scored, a)["set"].isin(["refer", "empty"]).mean() for a in alphas])


DECISION_FILE = "decision_calibration.json"  # what predict.py reads to give a new patient a set


def decision_calibration(run: dict, alpha: float) -> dict:
    """What predict.py needs for a new patient's calibrated probability and conformal set: the
    whole study's out-of-fold patient scores (each patient once, averaged over repeats) with
    their labels, for complete inputs ('all') and, where the model measured magnification
    importance, for each magnification masked ('without_40x', ...), and the temperature fitted
    on 'all'."""
    pooled = run["pooled"]
    kinds = {"all": "prob", **{f"without_{c.removeprefix('prob_without_')}": c for c in pooled.columns
                               if c.startswith("prob_without_")}}
    calibration = {}
    for kind, column in kinds.items():
        patients = pooled.groupby("patient").agg(label=("label", "first"), prob=(column, "mean"))
        calibration[kind] = {"prob": patients["prob"].round(6).tolist(), "label": patients["label"].astype(int).tolist()}
    everyone = calibration["all"]
    return {"alpha": alpha, "temperature": round(fit_temperature(everyone["prob"], everyone["label"]), 6),
            "calibration": calibration}


def write_decision_calibration(runs: dict, path, alpha: float) -> None:
    atomic_write_text(path, json.dumps({name: decision_calibration(run, alpha) for name, run in runs.items()}))


def decide(stored: dict, prob: float, missing: list[str], alpha: float | None = None) -> dict:
    """A new patient's calibrated probability, conformal set and decision ('benign',
    'malignant' or 'refer'), calibrated on the study's patients with the same kind of input:
    complete, or lacking the one magnification this patient lacks; a patient lacking more is
    told that no calibration fits it."""
    alpha = stored["alpha"] if alpha is None else alpha
    out = {"calibrated_probability": round(float(scaled([prob], stored["temperature"])[0]), 4), "alpha": alpha}
    kind = "all" if not missing else f"without_{missing[0]}" if len(missing) == 1 else None
    if kind not in stored["calibration"]:
        lacking = ", ".join(m.upper() for m in missing)
        return {**out, "conformal_set": None, "conformal_decision": None,
                "conformal_note": f"no calibration for a patient without {lacking}: the study measured complete "
                                  f"patients and each single magnification masked; no guarantee is given"}
    cal = stored["calibration"][kind]
    inside = prediction_sets(cal["prob"], cal["label"], [prob], alpha)[0]
    return {**out, "conformal_set": [name for name, kept in zip(("benign", "malignant"), inside) if kept],
            "conformal_decision": {"empty": "refer"}.get(SET_NAMES[tuple(inside)], SET_NAMES[tuple(inside)]),
            "calibrated_on": f"{len(cal['prob'])} study patients ({kind})"}
