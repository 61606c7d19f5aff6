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


def test_with_repeats_eachpatient_counts_once_in_wilson_counts():
    """Two repeats test every patient twice: 4 patients, not 8, and the probability averaged."""
    from utils.report.tables import patient_counts, patients_once

    rows = []
    for repeat in (0, 1):
        for patient, label, prob in (("a", 1, 0.9), ("b", 1, 0.4 + 0.3 * repeat), ("c", 0, 0.1), ("d", 0, 0.2)):
            rows.append({"repeat": repeat, "fold": repeat * 2, "patient": patient, "group": patient,
                         "label": label, "subtype": 4 * label, "prob": prob, "threshold": 0.5})
    pooled = pd.DataFrame(rows)
    once = patients_once(pooled)
    assert len(once) == 4 and once.set_index("patient").loc["b", "prob"] == pytest.approx(0.55)
    assert patient_counts(pooled, "accuracy") == (4, 4)
    assert patient_counts(pooled, "sensitivity") == (2, 2)


def test_the_pooled_roc_counts_each_patient_once_and_bands_the_curve(tmp_path, monkeypatch):
    import pandas as pd

    from utils.report import plottings

    rng = np.random.default_rng(0)
    patients = pd.DataFrame({"patient": [f"p{i}" for i in range(12)], "group": [str(i // 2) for i in range(12)],
                             "label": [i % 2 for i in range(12)]})
    pooled = pd.concat([patients.assign(fold=r * 2 + i % 2, repeat=r, prob=np.clip(0.5 + 0.3 * (2 * patients.label - 1)
                                                                            + rng.normal(0, 0.3, 12), 0, 1),
                                        threshold=0.5)
                        for r in range(2) for i in range(1)])
    captured = {}
    real_save = plottings._save
    monkeypatch.setattr(plottings, "_save", lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    path = plottings.pooled_roc({"mmnet": {"pooled": pooled}}, ["mmnet"], tmp_path / "roc.png", n_boot=50)
    assert path.is_file()
    ax = captured["fig"].axes[0]
    assert "12 patients, 6 malignant" in ax.get_legend().get_texts()[0].get_text()  # not 24 under 2 repeats
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() >= 0 and band[:, 1].max() <= 1
