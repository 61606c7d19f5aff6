"""Patient-grouped folds against the real 7,909-file listing."""
import pandas as pd
import pytest

from preprocess.preprocess import parse_name
from preprocess.splits import FoldError, assert_disjoint, build_folds, kaggle_folds, load_folds, write_folds


@pytest.fixture(scope="module")
def real_index(listing):
    return pd.DataFrame([{"path": p, **parse_name(f)} for p, f in zip(listing["path"], listing["filename"])])


@pytest.fixture(scope="module")
def real_folds(real_index):
    return build_folds(real_index, n_folds=5, seed=42, inner_fraction=0.2)


def test_no_slide_group_in_two_test_folds(real_folds):
    assert (real_folds.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(real_folds["fold"].unique()) == [0, 1, 2, 3, 4]


def test_every_patient_in_exactly_one_test_fold(real_folds, real_index):
    assert sorted(real_folds["patient"]) == sorted(real_index["patient"].unique())
    assert not real_folds["patient"].duplicated().any()
    for k in range(5):
        assert set(real_folds.loc[real_folds[f"role_f{k}"] == "test", "patient"]) == \
            set(real_folds.loc[real_folds["fold"] == k, "patient"])


def test_each_test_fold_holds_both_classes(real_folds):
    assert (real_folds.groupby("fold")["label"].nunique() == 2).all()


def test_inner_validation_disjoint_from_test_and_train(real_folds):
    for k in range(5):
        roles = real_folds.groupby("group")[f"role_f{k}"].nunique()
        assert (roles == 1).all()
        val = real_folds[real_folds[f"role_f{k}"] == "val"]
        assert len(val) and val["label"].nunique() == 2
        assert not set(val["group"]) & set(real_folds.loc[real_folds["fold"] == k, "group"])


def test_same_seed_same_folds_other_seed_other_folds(real_index, real_folds):
    again = build_folds(real_index, 5, 42, 0.2)
    pd.testing.assert_frame_equal(again, real_folds)
    other = build_folds(real_index, 5, 7, 0.2)
    assert not other["fold"].equals(real_folds["fold"])


def test_shared_slide_number_stays_together(real_folds):
    # 22549AB/CD/G are three patient dirs with one slide number: one fold for all.
    assert real_folds.loc[real_folds["group"] == "22549", "fold"].nunique() == 1
    assert (real_folds["group"] == "22549").sum() == 3


def test_leak_is_caught_on_write_and_load(real_folds, tmp_path):
    path = write_folds(real_folds, tmp_path)
    assert len(load_folds(path)) == 82
    broken = real_folds.copy()
    row = broken.index[broken["group"] == "22549"][0]
    broken.loc[row, "fold"] = (broken.loc[row, "fold"] + 1) % 5
    broken.loc[row, [f"role_f{k}" for k in range(5)]] = "train"
    broken.loc[row, f"role_f{broken.loc[row, 'fold']}"] = "test"
    with pytest.raises(FoldError, match="22549"):
        assert_disjoint(broken)
    broken.to_csv(path, index=False)
    with pytest.raises(FoldError, match="22549"):
        load_folds(path)


def test_too_few_groups_names_the_class(real_index):
    benign = real_index[real_index["label"] == 0]["group"].unique()[:2]
    small = real_index[(real_index["label"] == 1) | real_index["group"].isin(benign)]
    with pytest.raises(FoldError, match="benign has 2 slide group"):
        build_folds(small, 5, 42, 0.2)


def _kaggle_table(real_index, fold_of_patient):
    rows = []
    for fold in range(1, 6):
        for patient, path in zip(real_index["patient"], real_index["path"]):
            rows.append({"fold": fold, "mag": 40, "grp": "test" if fold_of_patient[patient] == fold else "train",
                         "filename": path})
    return pd.DataFrame(rows)


def test_kaggle_folds_accepted_only_without_leak(real_index, real_folds, tmp_path):
    fold_of = dict(zip(real_folds["patient"], real_folds["fold"] + 1))
    csv = tmp_path / "Folds.csv"
    _kaggle_table(real_index, fold_of).to_csv(csv, index=False)
    accepted = kaggle_folds(csv, real_index, 0.2, 42)
    assert accepted.set_index("patient")["fold"].to_dict() == \
        real_folds.set_index("patient")["fold"].to_dict()
    fold_of["SOB_B_A_14-22549CD"] = fold_of["SOB_B_A_14-22549AB"] % 5 + 1  # split a slide group
    _kaggle_table(real_index, fold_of).to_csv(csv, index=False)
    with pytest.raises(FoldError, match="22549"):
        kaggle_folds(csv, real_index, 0.2, 42)


def test_dry_run_subset_takes_whole_slide_groups_of_both_classes(real_index):
    from utils.study.pipeline import select_patients

    subset = select_patients(real_index, 16, seed=42)
    chosen = real_index[real_index["group"].isin(set(subset["group"]))]
    assert set(chosen["patient"]) == set(subset["patient"])  # never half a slide group
    per_class = subset.groupby("label")["patient"].nunique()
    assert list(per_class.index) == [0, 1] and (per_class >= 8).all()
    assert len(subset) == len(chosen)
