"""External validation: the fold-model ensemble on another cohort, reported with the same
patient-level metrics and intervals as the cross-validation (Wilson for proportions, a
slide-group bootstrap for the rest), a ROC curve, a reliability plot, and the patients that
could not be scored with the reason.

external_report(patients, unscored, out_dir, title, n_boot) writes to out_dir:
predictions.csv (one row per patient), metrics.csv, roc.png, calibration.png, report.md and
report.html.
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from utils.files import markdown_table
from utils.metrics import DECISION_THRESHOLD, METRICS
from utils.report.statistics import bootstrap_ci
from utils.report.tables import PROPORTION_CI, PROPORTIONS, patient_proportion


def external_metrics(patients: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """metric, value, ci_low, ci_high, ci_method at patient level, decisions at the ensemble's
    threshold, as the cross-validation's table has them: Wilson intervals at the slide groups'
    effective sample size for the proportions (tables.patient_proportion), a bootstrap of slide
    groups within class for the rest (NaN where a class is missing)."""
    frame = patients.assign(fold=0)
    ci = bootstrap_ci(frame, "patient", n_boot=n_boot, seed=seed) if frame["label"].nunique() == 2 else {}
    rows = []
    for metric in METRICS:
        value, low, high = ci.get(metric, (float("nan"),) * 3)
        method = "slide-group bootstrap"
        if metric in PROPORTIONS:
            counted = patient_proportion(frame.assign(repeat=0), metric)
            value, low, high, method = counted["value"], counted["ci_low"], counted["ci_high"], PROPORTION_CI
        rows.append({"metric": metric, "value": value, "ci_low": low, "ci_high": high, "ci_method": method})
    return pd.DataFrame(rows)


def _plots(patients: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    fig, (roc, rel) = plt.subplots(1, 2, figsize=(10, 4.5))
    if patients["label"].nunique() == 2:
        fpr, tpr, _ = roc_curve(patients["label"], patients["prob"])
        roc.plot(fpr, tpr, lw=2, label=f"ensemble ({len(patients)} patients)")
        bins = min(5, max(2, len(patients) // 4))
        observed, predicted = calibration_curve(patients["label"], patients["prob"], n_bins=bins, strategy="quantile")
        rel.plot(predicted, observed, marker="o", label="ensemble")
    roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    roc.set(title=f"{title}: ROC (patients)", xlabel="1 - specificity", ylabel="sensitivity")
    rel.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    rel.set(title=f"{title}: calibration", xlabel="predicted malignant probability",
            ylabel="observed malignant fraction", xlim=(0, 1), ylim=(0, 1))
    for ax in (roc, rel):
        ax.legend(fontsize=7, loc="lower right")
    paths = []
    for ax, name in ((roc, "roc.png"), (rel, "calibration.png")):
        extent = ax.get_tightbbox(fig.canvas.get_renderer()).transformed(fig.dpi_scale_trans.inverted())
        fig.savefig(out_dir / name, dpi=120, bbox_inches=extent.expanded(1.05, 1.05))
        paths.append(out_dir / name)
    plt.close(fig)
    return paths


def external_report(patients: pd.DataFrame, unscored: list[dict], out_dir: Path, title: str,
                    n_boot: int = 2000) -> Path:
    """patients: one row per scored patient (patient, group, label, prob, threshold, decision,
    images); unscored: [{patient, reason}]. Returns report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    patients = patients.reset_index(drop=True)
    patients.to_csv(out_dir / "predictions.csv", index=False)
    metrics = external_metrics(patients, n_boot)
    metrics.to_csv(out_dir / "metrics.csv", index=False)
    _plots(patients, out_dir, title)
    shown = metrics.assign(**{"value [95 % CI]": [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                                                  zip(metrics["value"], metrics["ci_low"], metrics["ci_high"])]})
    shown = shown[["metric", "value [95 % CI]", "ci_method"]]
    counts = f"{len(patients)} patients scored ({int(patients['label'].sum())} malignant), {len(unscored)} not scored"
    lines = [f"# External validation: {title}", "", counts + f"; decisions at the ensemble's threshold "
             f"({patients['threshold'].mean() if len(patients) else DECISION_THRESHOLD:.2f}). "
             "Research use only: not a diagnostic device.", "", markdown_table(shown), "",
             "![ROC](roc.png) ![calibration](calibration.png)", ""]
    conformal = conformal_summary(patients)
    if len(conformal):
        lines += ["## Conformal decisions (calibrated on the study's out-of-fold patients)", "",
                  markdown_table(conformal), ""]
    if unscored:
        lines += ["## Not scored", "", markdown_table(pd.DataFrame(unscored)), ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    body = (f"<h1>External validation: {html.escape(title)}</h1><p>{html.escape(counts)}</p>"
            + shown.to_html(index=False) + '<p><img src="roc.png" width="45%"> <img src="calibration.png" width="45%"></p>'
            + (("<h2>Not scored</h2>" + pd.DataFrame(unscored).to_html(index=False)) if unscored else ""))
    (out_dir / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>{body}")
    return out_dir / "report.md"


def conformal_summary(patients: pd.DataFrame) -> pd.DataFrame:
    """Per class: patients, how many the conformal set referred, and the coverage measured on
    this cohort (a decided patient is covered when decided right; a referred one always is)."""
    if "conformal_decision" not in patients or patients["conformal_decision"].isna().all():
        return pd.DataFrame()
    rows = []
    for label, name in ((0, "benign"), (1, "malignant")):
        part = patients[(patients["label"] == label) & patients["conformal_decision"].notna()]
        referred = part["conformal_decision"] == "refer"
        covered = referred | (part["conformal_decision"] == name)
        rows.append({"class": name, "patients": len(part), "referred": int(referred.sum()),
                     "coverage": f"{covered.mean():.3f}" if len(part) else "n/a"})
    return pd.DataFrame(rows)


def scored_frame(rows: list[dict]) -> pd.DataFrame:
    """The per-patient predictions as a frame with the columns external_report reads."""
    columns = ["patient", "group", "label", "prob", "threshold", "decision", "images", "conformal_decision"]
    return pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns).astype({"prob": float})

