"""Statistics that mean what they say: hand-computed oracles."""
import numpy as np
import pandas as pd
import pytest

from utils.report.statistics import corrected_resampled_ttest, corrected_t_interval


def test_differences_equal_up_to_rounding_are_ties_not_an_infinite_t():
    d = [0.05 + 1e-17 * i for i in range(5)]
    t, p = corrected_resampled_ttest(d, 80, 20)
    assert t == np.inf and p == pytest.approx(2 * 0.5 ** 5)  # the sign test, not p = 2.6e-60
    assert corrected_resampled_ttest([1e-18, -1e-18, 0.0], 80, 20) == (0.0, 1.0)


def test_the_sign_test_fallback_counts_folds_not_repeated_jobs():
    """5 folds x 3 repeats with one difference: 5 independent folds, p = 2 * 0.5^5."""
    _, p = corrected_resampled_ttest([0.1] * 15, 80, 20, folds=5)
    assert p == pytest.approx(0.0625)


def test_corrected_t_interval_by_hand():
    """d = .1 .. .5: mean .3, var .025, factor 1/5 + 20/80 = .45, se = sqrt(.01125) = .106066,
    t(0.975, 4) = 2.776445: half-width .294491."""
    mean, low, high = corrected_t_interval([0.1, 0.2, 0.3, 0.4, 0.5], 80, 20)
    assert mean == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - 0.294491, abs=1e-5) and high == pytest.approx(0.3 + 0.294491, abs=1e-5)
    t, p = corrected_resampled_ttest([0.1, 0.2, 0.3, 0.4, 0.5], 80, 20)
    assert t == pytest.approx(0.3 / 0.106066, rel=1e-4) and p == pytest.approx(0.0474, abs=5e-4)  # t(4) table


def _run(pooled: pd.DataFrame) -> dict:
    """What tables.load_runs gives for these predictions (one results.json per job)."""
    from utils.metrics import fold_metrics

    jobs = pooled[["repeat", "fold"]].drop_duplicates()
    results = [{"fold": int(f), "repeat": int(r), "threshold": 0.5, "patients": {"train": 8, "test": 4}}
               for r, f in jobs.itertuples(index=False)]
    return {"pooled": pooled, "results": results,
            "metrics": {int(f): fold_metrics(part, 0.5) for f, part in pooled.groupby("fold")}}


def _two_repeats() -> pd.DataFrame:
    """4 patients tested in 2 repeats; patient b is decided right in one and wrong in the other."""
    rows = []
    for repeat in (0, 1):
        for patient, label, prob in (("a", 1, 0.9), ("b", 1, 0.4 + 0.3 * repeat), ("c", 0, 0.1), ("d", 0, 0.2)):
            rows.append({"repeat": repeat, "fold": repeat * 2, "patient": patient, "group": patient,
                         "label": label, "subtype": 4 * label, "prob": prob, "threshold": 0.5})
    return pd.DataFrame(rows)


def test_with_repeats_a_proportion_and_its_interval_rest_on_the_same_counts():
    """b flips: sensitivity is 1.5 of 2 patients (each counted once), shown as 0.75 (the share
    of the 4 tests of malignant patients decided right), with the interval of those counts."""
    from utils.report.statistics import clustered_wilson
    from utils.report.tables import statistics

    stats = statistics({"m": _run(_two_repeats())}, n_boot=50, seed=0, families={})
    row = stats[(stats["level"] == "patient") & (stats["metric"] == "sensitivity")].iloc[0]
    assert (row["successes"], row["trials"], row["patients"]) == (1.5, 2, 4)
    assert row["pooled"] == pytest.approx(row["successes"] / row["trials"]) == pytest.approx(0.75)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(clustered_wilson([1.0, 0.5], ["a", "b"]))
    accuracy = stats[(stats["level"] == "patient") & (stats["metric"] == "accuracy")].iloc[0]
    assert accuracy["pooled"] == pytest.approx(3.5 / 4) and accuracy["trials"] == 4


def test_clustered_wilson_by_hand():
    """One patient per slide group: the plain Wilson interval of the patients. Pairs of patients
    that always decide alike: the Wilson interval of the groups (half the evidence)."""
    from utils.report.statistics import clustered_wilson, effective_size, wilson

    single = [1.0] * 15 + [0.0] * 5
    assert effective_size(single, range(20)) == 20
    assert clustered_wilson(single, range(20)) == pytest.approx(wilson(15, 20))
    paired_groups = [i // 2 for i in range(20)]
    alike = [1.0] * 14 + [0.0] * 6  # groups 0-6 right, 7-9 wrong, both patients alike
    assert effective_size(alike, paired_groups) == 10
    assert clustered_wilson(alike, paired_groups) == pytest.approx(wilson(7, 10))
    assert effective_size([1.0] * 20, paired_groups) == 10  # p = 1: no variance seen, the groups count


def test_a_comparison_rests_on_the_patients_both_sides_scored():
    """The compared model lacks patient p3: its Δ AUC is the difference on the other patients
    (sklearn on the common patients), and the row counts 9 paired patients and 1 left out."""
    from sklearn.metrics import roc_auc_score

    from utils.report.tables import comparison_table, statistics

    rng = np.random.default_rng(3)
    base = pd.DataFrame({"patient": [f"p{i}" for i in range(10)], "group": [f"g{i}" for i in range(10)],
                         "label": [i % 2 for i in range(10)], "subtype": [4 * (i % 2) for i in range(10)],
                         "repeat": 0, "fold": [i % 2 for i in range(10)], "threshold": 0.5})
    ref = base.assign(prob=np.clip(0.5 + 0.25 * (2 * base["label"] - 1) + rng.normal(0, 0.3, 10), 0, 1))
    other = base.assign(prob=rng.random(10))
    other = other[other["patient"] != "p3"]
    stats = statistics({"mmnet": _run(ref), "single_40x": _run(other)}, n_boot=100, seed=0,
                       families={"main": ("single_40x",)})
    row = stats[(stats["experiment"] == "single_40x") & (stats["level"] == "patient") & (stats["metric"] == "auc")].iloc[0]
    common = ref[ref["patient"] != "p3"]
    expected = roc_auc_score(other["label"], other["prob"]) - roc_auc_score(common["label"], common["prob"])
    assert row["diff_pooled"] == pytest.approx(expected)
    assert (row["paired_patients"], row["unpaired_patients"]) == (9, 1)
    shown = comparison_table(stats, ["mmnet", "single_40x"], "patient", "main").set_index("experiment")
    assert shown.loc["single_40x", "paired patients"] == "9 (1 scored by one side only, left out)"
    alone = comparison_table(stats, ["single_40x"], "patient", "main")
    assert not any(c.startswith("Δ") for c in alone.columns)  # nothing to compare with: no Δ columns


def test_the_pooled_roc_shows_the_tables_auc_and_counts_each_patient_once(tmp_path, monkeypatch):
    """Two repeats: the legend's AUC is the table's pooled patient AUC (the same tests), its
    count the 12 patients (not 24 tests), and the band brackets the curve almost everywhere."""
    from utils.report import plottings
    from utils.report.tables import statistics

    rng = np.random.default_rng(0)
    patients = pd.DataFrame({"patient": [f"p{i}" for i in range(12)], "group": [str(i // 2) for i in range(12)],
                             "label": [i % 2 for i in range(12)], "subtype": [4 * (i % 2) for i in range(12)]})
    pooled = pd.concat([patients.assign(fold=r * 2 + patients.index % 2, repeat=r, threshold=0.5,
                                        prob=np.clip(0.5 + 0.3 * (2 * patients.label - 1) + rng.normal(0, 0.3, 12), 0, 1))
                        for r in range(2)], ignore_index=True)
    captured = {}
    real_save = plottings._save
    monkeypatch.setattr(plottings, "_save", lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    plottings.pooled_roc({"mmnet": {"pooled": pooled}}, ["mmnet"], tmp_path / "roc.png", n_boot=200)
    legend = captured["fig"].axes[0].get_legend().get_texts()[0].get_text()
    stats = statistics({"mmnet": _run(pooled)}, n_boot=50, seed=0, families={})
    auc = stats[(stats["level"] == "patient") & (stats["metric"] == "auc")]["pooled"].iloc[0]
    assert f"AUC {auc:.3f}" in legend and "12 patients, 6 malignant" in legend
    ax = captured["fig"].axes[0]
    band = ax.collections[0].get_paths()[0].vertices
    fpr, tpr = ax.lines[0].get_data()
    grid = np.linspace(0, 1, 101)
    low, high = band[1:102, 1], band[102:203][::-1, 1]  # fill_between's polygon: start, lower edge, upper edge back
    assert np.allclose(band[1:102, 0], grid) and (low <= high + 1e-9).all()
    curve = np.interp(grid, fpr, tpr)
    assert np.mean((low <= curve + 1e-9) & (curve <= high + 1e-9)) >= 0.8


def test_scored_patients_say_who_was_left_out_and_why():
    """A 100X baseline that scored a and b: c had no 100X image, d's test fold never finished."""
    from config import Config
    from utils.report.tables import scored_patients_table

    folds = pd.DataFrame({"patient": ["a", "b", "c", "d"], "fold": [0, 1, 0, 2]})
    runs = {"single_100x": {"pooled": pd.DataFrame({"patient": ["a", "b"]}),
                            "results": [{"fold": 0, "repeat": 0}, {"fold": 1, "repeat": 0}]}}
    row = scored_patients_table(runs, folds, Config()).iloc[0]
    assert (row["magnifications"], row["patients scored"], row["of"]) == ("100X", 2, 4)
    assert row["left out"] == "1 without a usable 100X image; 1 in test folds that did not finish"
    assert row["left-out patients"] == "c, d"


def test_the_report_reads_magnification_importance_and_fusion_weights_in_words():
    """A magnification carries the decision only where the fold mean's t interval lies above 0
    (hand values: 100X loses 0.2-0.3 in every fold, 200X is mixed); weights within 0.1 of an
    even share read as flat."""
    import pandas as pd

    from utils.report.weights import fusion_reading, importance_reading

    folds = pd.DataFrame({"fold": ["0", "1", "2", "3"], "100X": [0.2, 0.3, 0.25, 0.2], "200X": [0.3, -0.4, 0.1, -0.1]})
    table = pd.concat([folds, pd.DataFrame([{"fold": "mean ± sd", "100X": "0.237", "200X": "-0.025"}])], ignore_index=True)
    text = importance_reading(table)
    half = 3.182446 * np.std([0.2, 0.3, 0.25, 0.2], ddof=1) / 2  # t(0.975, 3) x sd / sqrt(4)
    assert f"masking 100X costs AUC in 4 of 4 folds (mean +0.237, t interval [{0.2375 - half:.3f}, {0.2375 + half:.3f}])" in text
    assert "masking 200X costs AUC in 2 of 4 folds" in text and text.endswith("100X carries the decision (its interval lies above 0).")
    mixed = table.assign(**{"100X": [0.2, -0.3, 0.25, 0.2, ""]})
    assert "No magnification's loss is distinguishable from 0" in importance_reading(mixed)
    flat = pd.DataFrame({"fold": ["0", "1", "mean ± sd"], "100X": [0.45, 0.55, ""], "200X": [0.55, 0.45, ""]})
    assert fusion_reading(flat).startswith("Reading: flat: every fold's weights lie within 0.1 of an even share (0.50)")
    assert "not flat" in fusion_reading(flat.assign(**{"100X": [0.2, 0.5, ""], "200X": [0.8, 0.5, ""]}))


def test_hierarchy_attention_by_hand():
    """Two folds of 100X/200X tuples, 200X (level 1) attending to 100X (level 0). Fold 0: tuple a
    has both (0.8 on 100X, 0.2 itself), tuple b lacks 100X (weight 0, itself 1: not counted,
    nothing below), tuple c lacks 200X (NaN: not counted). Fold 1: one tuple, 0.6/0.4."""
    from utils.report.weights import hierarchy_attention

    fold0 = pd.DataFrame({"h_200x_100x": [0.8, 0.0, np.nan], "h_200x_200x": [0.2, 1.0, np.nan]})
    fold1 = pd.DataFrame({"h_200x_100x": [0.6], "h_200x_200x": [0.4]})
    table = hierarchy_attention({"predictions": [fold0, fold1]})
    row = table.iloc[0]
    assert (row["level"], row["folds"], row["tuples"]) == ("200X", 2, 2)
    assert row["100X"] == "0.700 ± 0.141" and row["200X"] == "0.300 ± 0.141" and row["even share"] == "0.500 ± 0.000"
    assert "200X keeps 0.30 on itself against an even share of 0.50" in table.attrs["reading"]
    assert "Not flat" in table.attrs["reading"]
