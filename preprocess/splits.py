"""Patient-grouped, stratified folds: no numeric slide group is ever on both sides of a split."""
from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from preprocess.preprocess import parse_name
from utils.experiments import inner_job_number, inner_place


class FoldError(RuntimeError):
    """Folds cannot be built or loaded without breaking the protocol."""


def patient_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per patient dir: group, label, subtype, image count."""
    table = (index.groupby("patient")
             .agg(group=("group", "first"), label=("label", "first"),
                  tumor_class=("tumor_class", "first"), subtype=("subtype", "first"),
                  n_images=("path", "size"))
             .reset_index())
    return table.sort_values("patient").reset_index(drop=True)


def group_labels(patients: pd.DataFrame) -> pd.Series:
    """Binary label per slide group; the majority wins if a group ever mixes classes."""
    return patients.groupby("group")["label"].agg(lambda s: int(s.mean() >= 0.5))


def _check_enough_groups(labels: pd.Series, n_splits: int, what: str) -> None:
    for label, count in labels.value_counts().items():
        if count < n_splits:
            name = "malignant" if label else "benign"
            raise FoldError(f"{what}: class {name} has {count} slide group(s) but {n_splits} "
                            f"folds were asked for; lower --folds or add data")


def group_subtypes(patients: pd.DataFrame) -> pd.Series:
    """Subtype per slide group (the most common among its patients: 14-13412 is DC and LC)."""
    return patients.groupby("group")["subtype"].agg(lambda s: s.mode().sort_values().iloc[0])


def _split_groups(labels: pd.Series, subtypes: pd.Series, n_folds: int, seed: int) -> dict:
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of_group, groups = {}, labels.index.to_numpy()
    with warnings.catch_warnings():  # rare subtypes (phyllodes: 2 slide groups) have fewer groups than folds
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, test) in enumerate(splitter.split(groups, subtypes.to_numpy(), groups)):
            fold_of_group.update({g: fold for g in groups[test]})
    return fold_of_group


def outer_folds(patients: pd.DataFrame, n_folds: int, seed: int, attempts: int = 20) -> pd.Series:
    """Fold index per patient from StratifiedGroupKFold over slide groups, stratified on the
    subtype: every training part holds every subtype that has two or more slide groups, and
    every test fold both classes. Both are checked; when a shuffle misses, the next of a fixed
    sequence of shuffles is taken (deterministic for a seed)."""
    labels = group_labels(patients)
    _check_enough_groups(labels, n_folds, "outer folds")
    subtypes = group_subtypes(patients).reindex(labels.index)
    return _first_passing_split(patients, (labels, subtypes), n_folds, seed, attempts,
                                lambda folds: check_outer_coverage(patients.assign(fold=folds), n_folds))


def _first_passing_split(patients: pd.DataFrame, strata: tuple, n_folds: int, seed: int, attempts: int,
                         check) -> pd.Series:
    """Fold per patient from the first of a fixed sequence of shuffles (seed, seed + 104729, ...)
    whose folds pass check (which raises FoldError); the last attempt's error when none does.
    strata: (label per slide group, what to stratify on per slide group)."""
    for attempt in range(attempts):
        folds = patients["group"].map(_split_groups(*strata, n_folds, seed + 104729 * attempt))
        try:
            check(folds)
            return folds
        except FoldError:
            if attempt == attempts - 1:
                raise


def check_outer_coverage(patients: pd.DataFrame, n_folds: int) -> None:
    """Both classes in every test fold; every subtype with 2+ slide groups in every training part."""
    groups_per_subtype = patients.groupby("subtype")["group"].nunique()
    for fold in range(n_folds):
        test, train = patients[patients["fold"] == fold], patients[patients["fold"] != fold]
        if test["label"].nunique() < 2:
            raise FoldError(f"outer fold {fold} has one class only in its test part; try another --seed")
        missing = sorted(set(groups_per_subtype.index[groups_per_subtype >= 2]) - set(train["subtype"]))
        if missing:
            raise FoldError(f"outer fold {fold}: the training part lacks subtype(s) {', '.join(missing)}; "
                            f"try another --seed")


def inner_validation_groups(patients: pd.DataFrame, fraction: float, seed: int) -> set:
    """A class-stratified share of the training slide groups, at least one of each class."""
    labels = group_labels(patients)
    _check_enough_groups(labels, 2, "inner validation")
    rng = np.random.default_rng(seed)
    chosen = set()
    for label in sorted(labels.unique()):
        groups = sorted(labels.index[labels == label])
        take = min(len(groups) - 1, max(1, math.ceil(fraction * len(groups))))
        chosen.update(rng.choice(groups, size=take, replace=False).tolist())
    return chosen


def repeat_column(repeat: int) -> str:
    """The outer-fold column of one repetition of the cross-validation."""
    return "fold" if repeat == 0 else f"fold_r{repeat}"


def add_inner_roles(folds: pd.DataFrame, fraction: float, seed: int, repeat: int = 0) -> pd.DataFrame:
    """Columns role_f<j>: test / train / val of each patient when outer fold k of this
    repetition is the test fold (j = repeat * folds + k, the job's fold number)."""
    folds, column = folds.copy(), repeat_column(repeat)
    n_folds = folds[column].nunique()
    for k in sorted(folds[column].unique()):
        j = repeat * n_folds + int(k)
        train = folds[folds[column] != k]
        val_groups = inner_validation_groups(train, fraction, seed + 1000 + j)
        role = np.where(folds[column] == k, "test",
                        np.where(folds["group"].isin(val_groups), "val", "train"))
        folds[f"role_f{j}"] = role
    return folds


def build_folds(index: pd.DataFrame, n_folds: int, seed: int, inner_fraction: float,
                repeats: int = 1, select_folds: int = 0) -> pd.DataFrame:
    """Outer folds (and, with repeats > 1, further repetitions with new fold seeds), each with
    its inner validation groups; with select_folds, every outer job's selection folds too."""
    folds = patient_table(index)
    for repeat in range(repeats):
        folds[repeat_column(repeat)] = outer_folds(folds, n_folds, seed + 7919 * repeat).astype(int)
        folds = add_inner_roles(folds, inner_fraction, seed, repeat)
    if select_folds:
        folds = add_selection_roles(folds, select_folds, inner_fraction, seed)
    assert_disjoint(folds)
    return folds


def outer_job_count(folds: pd.DataFrame) -> int:
    """Outer jobs of a folds table: folds x repeats (the job numbers before any selection job)."""
    repeats = sum(1 for c in folds.columns if c == "fold" or c.startswith("fold_r"))
    return folds["fold"].nunique() * repeats


def _selection_folds(inside: pd.DataFrame, n_folds: int, seed: int, outer: int, attempts: int = 20) -> pd.Series:
    """Grouped folds of one outer job's training patients, stratified on the label (a training
    part holds too few slide groups per subtype to stratify on it), both classes in each."""
    labels = group_labels(inside)
    _check_enough_groups(labels, n_folds, f"selection folds of outer job {outer} (lower --select-folds)")

    def both_classes(folds: pd.Series) -> None:
        if any(inside.loc[folds == k, "label"].nunique() < 2 for k in range(n_folds)):
            raise FoldError(f"selection folds of outer job {outer}: no split with both classes in every fold; "
                            f"lower --select-folds or try another --seed")
    return _first_passing_split(inside, (labels, labels), n_folds, seed, attempts, both_classes).astype(int)


def add_selection_roles(folds: pd.DataFrame, select_folds: int, fraction: float, seed: int) -> pd.DataFrame:
    """Columns role_f<n> of the selection jobs (utils.experiments numbers them): outer job j's
    training patients (train and val) split again into select_folds grouped, stratified folds;
    its test patients are 'outside' and no inner job reads them."""
    folds, outer = folds.copy(), outer_job_count(folds)
    for j in range(outer):
        inside = folds[folds[f"role_f{j}"] != "test"]
        inner = _selection_folds(inside, select_folds, seed + 3331 * (j + 1), j)
        for i in range(select_folds):
            n = inner_job_number(outer, select_folds, j, i)
            train = inside[inner != i]
            try:
                val_groups = inner_validation_groups(train, fraction, seed + 5000 + n)
            except FoldError:  # too few slide groups to hold some out: the job trains on all (--model-selection last)
                val_groups = set()
            role = pd.Series("outside", index=folds.index)
            role[inside.index] = np.where(inner == i, "test", np.where(inside["group"].isin(val_groups), "val", "train"))
            folds[f"role_f{n}"] = role
    return folds


def assert_disjoint(folds: pd.DataFrame) -> None:
    """Raise FoldError if any patient or slide group sits on two sides of any split."""
    if folds["patient"].duplicated().any():
        raise FoldError("a patient appears twice in the folds table")
    outer_count = outer_job_count(folds)
    for role_col in [c for c in folds.columns if c.startswith("role_f")]:
        sides = folds.groupby("group")[role_col].nunique()
        leaking = sorted(sides.index[sides > 1])
        if leaking:
            raise FoldError(f"slide group(s) {', '.join(leaking)} straddle splits in {role_col}")
        job, n_folds = int(role_col.removeprefix("role_f")), folds["fold"].nunique()
        if job >= outer_count:  # a selection job: never a patient of its outer job's test fold
            outer = f"role_f{inner_place(outer_count, _select_folds(folds), job)[0]}"
            if outer not in folds or not ((folds[outer] == "test") == (folds[role_col] == "outside")).all():
                raise FoldError(f"{role_col}: a selection job's patients are not its outer job's training patients")
        else:
            column, fold = repeat_column(job // n_folds), job % n_folds
            if column not in folds or not ((folds[column] == fold) == (folds[role_col] == "test")).all():
                raise FoldError(f"{role_col}: the test role does not match the fold column")
        for role in ("train", "val", "test"):
            present = folds.loc[folds[role_col] == role, "label"].unique()
            if role == "val" and len(present) == 0 and job >= outer_count:
                continue  # a selection job too small to hold validation patients out
            if len(present) < 2:
                raise FoldError(f"{role_col}: the {role} part lacks a class")


def _select_folds(folds: pd.DataFrame) -> int:
    """Selection folds per outer job, from the number of role columns."""
    roles = sum(1 for c in folds.columns if c.startswith("role_f"))
    return max(1, (roles - outer_job_count(folds)) // outer_job_count(folds))


def write_folds(folds: pd.DataFrame, output_dir: str | Path) -> Path:
    assert_disjoint(folds)
    path = Path(output_dir) / "folds.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(path, index=False)
    return path


def load_folds(path: str | Path, index: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read folds.csv, check disjointness and (if given) that it covers the indexed patients."""
    folds = pd.read_csv(path, dtype={"group": str})
    assert_disjoint(folds)
    if index is not None:
        missing = sorted(set(index["patient"]) - set(folds["patient"]))
        if missing:
            raise FoldError(f"{path} lacks {len(missing)} indexed patient(s) (e.g. {missing[0]}); "
                            f"delete it to rebuild the folds")
    return folds


def kaggle_folds(csv_path: str | Path, index: pd.DataFrame, inner_fraction: float,
                 seed: int) -> pd.DataFrame:
    """Folds from a Kaggle Folds.csv, accepted only if no slide group straddles a split."""
    table = pd.read_csv(csv_path)
    parsed = table["filename"].map(lambda p: parse_name(Path(str(p)).name))
    if parsed.isna().any():
        raise FoldError(f"{csv_path}: {int(parsed.isna().sum())} file name(s) do not parse")
    table["group"] = [p["group"] for p in parsed]
    table["patient"] = [p["patient"] for p in parsed]
    sides = table.groupby(["fold", "group"])["grp"].nunique()
    leaking = sorted({g for (_, g), n in sides.items() if n > 1})
    if leaking:
        raise FoldError(f"{csv_path} puts slide group(s) {', '.join(leaking)} in both train and "
                        f"test; use the default --folds-source grouped")
    test_folds = table[table["grp"].str.lower() == "test"].groupby("patient")["fold"].unique()
    if (test_folds.map(len) != 1).any() or len(test_folds) != index["patient"].nunique():
        raise FoldError(f"{csv_path}: test parts are not a partition of the patients "
                        f"(each patient must be tested in exactly one fold)")
    patients = patient_table(index)
    fold_ids = {f: i for i, f in enumerate(sorted({v[0] for v in test_folds}))}
    patients["fold"] = patients["patient"].map(lambda p: fold_ids[test_folds[p][0]])
    folds = add_inner_roles(patients, inner_fraction, seed)
    assert_disjoint(folds)
    return folds


def folds_fingerprint(folds: pd.DataFrame, job: int | None = None) -> str:
    """Changes whenever a patient's role changes: in job fold `job`, or in any fold (None)."""
    roles = [f"role_f{job}"] if job is not None else sorted(c for c in folds.columns if c.startswith("role_f"))
    return hashlib.sha256(folds[["patient", *roles]].sort_values("patient").to_csv(index=False).encode()).hexdigest()[:16]
