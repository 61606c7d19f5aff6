"""One stain reference per outer fold (and repeat), shared by every experiment of the study.

The reference is fitted once on that fold's training patients at the study's magnifications
(--magnifications: the same set whichever experiments run, so a single-magnification baseline is
normalised exactly as MMNet is and their comparison is paired on stain too), written under
output/stain/ and read by every job of the fold, in this process, in worker processes or on
other nodes. The file name holds a key of everything the reference depends on, which also enters
the fold's identity: a fold trained on another reference is not reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from config import STAIN_FIT_IMAGES
from preprocess.dataset import patient_images
from preprocess.stain import fold_reference
from utils.device import derived_seed
from utils.engine.saving import load_checkpoint, save_checkpoint

log = logging.getLogger("mmnet")
STAIN_DIR = "stain"  # output/stain/fold<k>-<key>.pt


def study_magnifications(cfg, study) -> tuple:
    """The magnifications the study reads (the user's --magnifications), whatever the
    experiment: a single-magnification experiment's config has its own."""
    return tuple(getattr(study, "magnifications", None) or cfg.magnifications)


def reference_patients(cfg, study, fold: int) -> list[str]:
    """The fold's training patients: every patient outside its test fold, less the inner
    validation patients where an epoch is chosen on them."""
    role = study.folds.set_index("patient")[f"role_f{fold}"]
    roles = ("train",) if cfg.model_selection == "inner_val" else ("train", "val")
    return sorted(role.index[role.isin(roles)])


def reference_key(cfg, study, fold: int) -> str | None:
    """What the fold's reference depends on (method, patients, magnifications, frame size,
    seed), hashed; None without stain normalisation."""
    method = cfg.stain_method()
    if method == "none":
        return None
    parts = [method, reference_patients(cfg, study, fold), study_magnifications(cfg, study), cfg.image_size,
             cfg.seed, fold, STAIN_FIT_IMAGES]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def reference_file(cfg, fold: int, key: str) -> Path:
    return Path(cfg.output_dir) / STAIN_DIR / f"fold{fold}-{key}.pt"


def shared_reference(cfg, study, fold: int) -> dict | None:
    """The fold's reference (a normaliser's state_dict): read from output/stain/, or fitted
    there on first use. None without stain normalisation."""
    key = reference_key(cfg, study, fold)
    if key is None:
        return None
    path = reference_file(cfg, fold, key)
    if path.is_file():
        return load_checkpoint(path)
    train = patient_images(study.index, study.usable, reference_patients(cfg, study, fold),
                           study_magnifications(cfg, study), "pooled")
    state = fold_reference(cfg.stain_method(), study.source, train, derived_seed(cfg.seed, fold, 3))
    save_checkpoint(state, path)  # atomic: two processes fitting the same fold write the same file
    log.info("stain reference of fold %d (%s, %s) fitted on %d training patients -> %s", fold, cfg.stain_method(),
             "/".join(f"{m}X" for m in study_magnifications(cfg, study)), len(train), path.name)
    return state


def fit_study_references(cfg, study, folds) -> None:
    """Every job fold's reference fitted before jobs start, so that workers only read them (a
    selection job's on its own training patients)."""
    for fold in folds:
        shared_reference(cfg, study, fold)
