"""What the models weigh, per fold and as fold mean ± sd: magnification importance (the AUC
lost with one magnification masked), MMNet's fusion weights and every model's magnification
weights."""
from __future__ import annotations

import pandas as pd
from sklearn.metrics import roc_auc_score

from utils.metrics import fold_columns, patient_probabilities, summary_row
from utils.report.statistics import corrected_t_interval


def _with_summary(table: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([table, pd.DataFrame([summary_row(table)])], ignore_index=True)


def magnification_importance(run: dict) -> pd.DataFrame:
    """Per fold, the drop in patient-level AUC when one magnification is masked out of every
    test tuple (the model sees the other three): what that magnification contributes. Both
    AUCs come from the plain view (prob_plain), not the test-time views."""
    rows = []
    for r, frame in zip(run["results"], run["predictions"]):
        masked = [c for c in frame.columns if c.startswith("prob_without_")]  # in magnification order
        full = patient_probabilities(frame.assign(prob=frame.get("prob_plain", frame["prob"])))
        if not masked or full["label"].nunique() < 2:
            continue
        row = fold_columns(run, r["fold"])
        for column in masked:
            without = patient_probabilities(frame.assign(prob=frame[column]))
            row[column.removeprefix("prob_without_").upper()] = round(
                roc_auc_score(full["label"], full["prob"]) - roc_auc_score(without["label"], without["prob"]), 4)
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = _with_summary(pd.DataFrame(rows))
    table.attrs["reading"] = importance_reading(table)
    return table


def _magnification_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.endswith("X") and c[:-1].isdigit()]


def importance_reading(table: pd.DataFrame) -> str:
    """What the importance table shows, in words: per magnification, the folds where masking it
    cost AUC and the fold mean's t interval; a magnification carries the decision only where
    that interval lies above 0 (folds share training patients: the interval is a guide)."""
    folds, parts, carriers = table.iloc[:-1], [], []
    for mag in _magnification_columns(table):
        values = folds[mag].astype(float).to_numpy()
        mean, low, high = corrected_t_interval(values, n_train=1, n_test=0)  # n_test 0: the plain t interval
        parts.append(f"masking {mag} costs AUC in {int((values > 0).sum())} of {len(values)} folds (mean {mean:+.3f}, "
                     f"t interval [{low:.3f}, {high:.3f}])")
        carriers += [mag] if low > 0 else []
    verdict = (f"{' and '.join(carriers)} carries the decision (its interval lies above 0)" if carriers else
               "no magnification's loss is distinguishable from 0 over these folds: which one carries the decision "
               "is not shown")
    return f"Reading: {'; '.join(parts)}. {verdict[0].upper()}{verdict[1:]}."


def fusion_reading(table: pd.DataFrame) -> str:
    """Flat or not: the fusion weights against an even share (1/M), fold by fold."""
    mags = _magnification_columns(table)
    folds, even = table.iloc[:-1][mags].astype(float), 1 / len(mags)
    spread = float((folds - even).abs().to_numpy().max())
    means = ", ".join(f"{m} {folds[m].mean():.2f}" for m in mags)
    if spread <= 0.1:
        return f"Reading: flat: every fold's weights lie within 0.1 of an even share ({even:.2f}); means {means}."
    return (f"Reading: not flat within a fold (up to {spread:.2f} from an even share of {even:.2f}), means {means}; "
            f"{'near even over the folds' if (folds.mean() - even).abs().max() <= 0.1 else 'uneven over the folds'}: "
            f"the weights say how the fused vector is formed, masking says what decides.")


def fusion_weights(run: dict) -> pd.DataFrame:
    """Mean fusion weight per magnification on each fold's test tuples. Taken after the
    hierarchical attention has mixed the levels: a weight says how the fused vector is
    formed, not what a magnification's images contribute (see magnification_importance)."""
    rows = [{**fold_columns(run, r["fold"]), **means.round(4).to_dict()}
            for r, means in zip(run["results"], _fold_weight_means(run))
            if len(means)]  # none for a fusion that mixes magnifications inside its vector (--fusion concat)
    if not rows:
        return pd.DataFrame()
    table = _with_summary(pd.DataFrame(rows))
    if len(_magnification_columns(table)) > 1:
        table.attrs["reading"] = fusion_reading(table)
    return table


def _fold_weight_means(run: dict) -> list[pd.Series]:
    """Per fold, the mean of each w_ column over the test samples, indexed '40X'..."""
    return [frame[[c for c in frame.columns if c.startswith("w_")]].mean().rename(lambda c: c.removeprefix("w_").upper())
            for frame in run["predictions"]]


def magnification_weights(runs: dict) -> pd.DataFrame:
    """Per experiment whose model gives magnification weights (w_ columns, more than one):
    the mean weight of each magnification over every fold's test samples."""
    rows = []
    for name, run in runs.items():
        folds = _fold_weight_means(run)
        if folds and len(folds[0]) > 1:
            rows.append({"experiment": name, **pd.concat(folds, axis=1).mean(axis=1).round(4).to_dict()})
    return pd.DataFrame(rows)


def _hierarchy_fold(frame: pd.DataFrame, level: str, below: list[str]) -> dict | None:
    """One fold's mean attention of `level` on each level below (over the test tuples holding
    that level: a missing level gets weight exactly 0, a softmax never does) and on itself, and
    the even share, over its tuples that hold `level` and something below it."""
    weights = frame[[f"h_{level}_{k}" for k in below]]
    rows = frame[f"h_{level}_{level}"].notna() & (weights > 0).any(axis=1)
    if not rows.any():
        return None
    part = weights[rows]
    cells = {k.upper(): float(part[f"h_{level}_{k}"][part[f"h_{level}_{k}"] > 0].mean()) for k in below}
    cells[level.upper()] = float(frame.loc[rows, f"h_{level}_{level}"].mean())  # the diagonal: itself
    cells["even share"] = float((1 / (1 + (part > 0).sum(axis=1))).mean())
    cells["tuples"] = int(rows.sum())
    return cells


def hierarchy_attention(run: dict) -> pd.DataFrame:
    """MMNet's hierarchical attention on the test tuples: each level's weight on each level
    below it (where that level is present) and on itself, fold mean ± sd, beside the even
    share over the levels present; a reading says whether it is flat."""
    levels = [c.removeprefix("h_").split("_")[0] for c in run["predictions"][0].columns
              if c.startswith("h_") and c.split("_")[1] == c.split("_")[2]]
    rows, gaps = [], []
    for level in levels:
        below = [c.split("_")[2] for c in run["predictions"][0].columns if c.startswith(f"h_{level}_")][:-1]
        folds = pd.DataFrame([f for f in (_hierarchy_fold(frame, level, below) for frame in run["predictions"]) if f])
        if folds.empty:
            continue
        gaps.append((level.upper(), folds[level.upper()].mean(), folds["even share"].mean()))
        rows.append({"level": level.upper(), "folds": len(folds), "tuples": int(folds.pop("tuples").sum()),
                     **{c: f"{folds[c].mean():.3f} ± {folds[c].std(ddof=1) if len(folds) > 1 else 0:.3f}" for c in folds}})
    keys = dict.fromkeys(c.split("_")[2].upper() for c in run["predictions"][0].columns if c.startswith("h_"))
    order = ["level", "folds", "tuples", *keys, "even share"]
    table = pd.DataFrame(rows)
    table = table[[c for c in order if c in table]].fillna("")  # above the diagonal: nothing
    if gaps:
        flat = all(abs(own - even) <= 0.1 for _, own, even in gaps)
        table.attrs["reading"] = ("Reading: " + "; ".join(f"{lvl} keeps {own:.2f} on itself against an even share of {even:.2f}"
                                                       for lvl, own, even in gaps) +
                                  (". Flat: every level's weight on itself lies within 0.1 of an even share, so the "
                                   "attention mixes the levels about equally." if flat else
                                   ". Not flat: at least one level departs by more than 0.1 from an even share."))
    return table
