"""Real multi-magnification patients (../shared/breakhis, skipped without it): the tuples built for
a patient with both 100X and 200X, and for patients with one magnification or a single image of
one, against counts made by hand from the folders' manifests."""
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED

FOLDERS = ("dev_200X_224_jpeg", "dev_multimag_224_jpeg")
# By hand from the manifests: images at 100X and 200X.
PATIENTS = {"SOB_B_A_14-29960CD": (8, 16), "SOB_B_F_14-23222AB": (0, 17), "SOB_M_DC_14-15696": (1, 22)}


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory):
    if not all((SHARED / f).is_dir() for f in FOLDERS):
        pytest.skip("../shared/breakhis real images not available")
    from PIL import Image

    root = tmp_path_factory.mktemp("real") / "tree"
    for folder in FOLDERS:
        for patient in PATIENTS:
            for f in sorted((SHARED / folder / patient).glob("*.jpg")):
                mag = re.search(r"-(40|100|200|400)-\d+$", f.stem)[1]
                target = root / patient / f"{mag}X" / f"{f.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(f).convert("RGB").save(target)
    return root


def _patients(tree: Path, magnifications):
    from preprocess.dataset import patient_images
    from preprocess.preprocess import index_dataset

    index, issues = index_dataset(tree)
    assert len(index) == sum(n100 + n200 for n100, n200 in PATIENTS.values())  # every image indexed
    missing = issues[issues["kind"] == "missing_magnification"].set_index("path")["detail"]
    assert list(missing.index) == ["40X", "100X", "400X"]  # said once per magnification, not per patient
    assert missing["100X"].startswith("1 of 3 patients have no 100X image: SOB_B_F_14-23222AB")
    return patient_images(index, np.ones(len(index), bool), sorted(PATIENTS), magnifications)


def test_evaluation_tuples_of_real_patients_match_the_hand_counts(real_tree):
    from preprocess.dataset import evaluation_tuples

    data = _patients(real_tree, (100, 200))
    tuples, owners = evaluation_tuples(data)
    for p, patient in enumerate(data.patients):
        n100, n200 = PATIENTS[patient]
        mine = tuples[owners == p]
        assert len(mine) == max(n100, n200)  # one tuple per image of the larger magnification
        assert sorted(mine[:, 1]) == sorted(data.rows[p][1])  # every 200X image exactly once
        if n100 == 0:
            assert (mine[:, 0] == -1).all()  # the missing magnification is an empty slot in every tuple
        else:  # each 100X image used ceil or floor of n200 / n100 times
            counts = np.unique(mine[:, 0], return_counts=True)[1]
            assert len(counts) == n100 and counts.max() - counts.min() <= 1 and counts.sum() == n200


def test_training_tuples_never_drop_a_patients_only_magnification(real_tree):
    from config import Config
    from preprocess.dataset import training_samples

    data = _patients(real_tree, (40, 100, 200, 400))
    cfg = Config(magnifications=(40, 100, 200, 400), magnification_dropout=0.5)
    tuples, owners = training_samples(data, 600, np.random.default_rng(0), cfg)
    assert ((tuples >= 0).sum(axis=1) >= 1).all()
    only_200 = data.patients.index("SOB_B_F_14-23222AB")
    assert (tuples[owners == only_200][:, [0, 1, 3]] == -1).all() and (tuples[owners == only_200][:, 2] >= 0).all()
    both = data.patients.index("SOB_B_A_14-29960CD")
    present = (tuples[owners == both] >= 0)[:, 1:3]
    assert present.all(axis=1).mean() < 0.6 and present.any(axis=1).all()  # dropout masks one of the two, never both
