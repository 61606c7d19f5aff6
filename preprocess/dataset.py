"""Multi-magnification tuples over the image cache.

A tuple is one image per magnification of one patient: a pairing, not a registered pyramid.
Tuples are arrays of cache rows, shape (T, M), with -1 where a patient lacks a magnification.
A bag (MIL models, sample_mode 'bag') is the same kind of array, (T, K): K images of one
patient from every magnification, -1 in the slots it does not fill.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from config import BAG_SIZED_AGGREGATORS, MAGNIFICATIONS, SUBTYPES
from preprocess.image_source import ImageSource, magnification_codes, reads_levels, upload_rows  # noqa: F401

# The image source is imported from here by the stages above (one place for the data layer).
from preprocess.splits import FoldError

log = logging.getLogger("mmnet")


@dataclass
class PatientImages:
    """Cache rows of each patient's images per magnification, for one split."""
    patients: list  # patient ids
    labels: np.ndarray  # (P,) 0 benign / 1 malignant
    subtypes: np.ndarray  # (P,) index into config.SUBTYPES
    groups: list  # numeric slide group per patient
    rows: list  # rows[p][m] = sorted np.ndarray of cache rows (may be empty)

    def __len__(self) -> int:
        return len(self.patients)


def patient_images(index: pd.DataFrame, usable: np.ndarray, patients, magnifications,
                   sample_mode: str = "tuple") -> PatientImages:
    """Group the usable cache rows of `patients` by magnification.

    sample_mode 'pooled' and 'bag' treat every magnification as one pool (M = 1).
    """
    frame = index.assign(row=np.arange(len(index)))[usable]
    frame = frame[frame["patient"].isin(set(patients)) & frame["mag"].isin(magnifications)]
    ids, labels, subtypes, groups, rows = [], [], [], [], []
    for patient, part in frame.groupby("patient", sort=True):
        part = part.sort_values(["mag", "seq"])
        if sample_mode in ("pooled", "bag"):
            per_mag = [part["row"].to_numpy()]
        else:
            per_mag = [part.loc[part["mag"] == m, "row"].to_numpy() for m in magnifications]
        ids.append(patient)
        labels.append(int(part["label"].iloc[0]))
        subtypes.append(SUBTYPES.index(part["subtype"].iloc[0]))
        groups.append(str(part["group"].iloc[0]))
        rows.append(per_mag)
    return PatientImages(ids, np.array(labels, dtype=np.int64), np.array(subtypes, dtype=np.int64),
                         groups, rows)


def fold_split(index, usable, folds, fold: int, cfg) -> dict[str, PatientImages]:
    """Train / inner-validation / test patients of one outer fold. With --model-selection last
    no epoch is chosen, so the inner-validation patients train too and there is no 'val'.

    A patient with no usable image of the magnifications this model reads (a single-
    magnification baseline and a patient lacking that magnification) is left out, and said so.
    """
    role = folds.set_index("patient")[f"role_f{fold}"]
    members = {"train": ("train",), "val": ("val",), "test": ("test",)}
    if cfg.model_selection == "last":
        members = {"train": ("train", "val"), "test": ("test",)}
    split = {}
    for name, roles in members.items():
        wanted = role.index[role.isin(roles)]
        if not len(wanted):
            raise FoldError(f"job fold {fold} has no '{name}' patients (a --select job too small to hold validation "
                             f"patients out): use --model-selection last or fewer --select-folds")
        split[name] = patient_images(index, usable, wanted, cfg.magnifications, cfg.sample_mode)
        left_out = sorted(set(wanted) - set(split[name].patients))
        if left_out:  # said once per experiment at the start of the study (left_out_patients)
            log.debug("fold %d %s: %d patient(s) have no usable %s image and are left out: %s", fold, name,
                      len(left_out), "/".join(f"{m}X" for m in cfg.magnifications), ", ".join(left_out))
    return split


def left_out_patients(index, usable, patients, cfg) -> list[str]:
    """The patients an experiment cannot score: none of their usable images is of a
    magnification it reads (a single-100X baseline and a patient imaged at 200X only)."""
    kept = set(patient_images(index, usable, patients, cfg.magnifications, cfg.sample_mode).patients)
    return sorted(set(patients) - kept)


def sampling_weights(data: PatientImages, class_balanced: bool = True) -> np.ndarray:
    """Probability of drawing each patient for a training tuple: proportional to its image
    count (every image is seen about equally often), rescaled to equal mass per class when
    class_balanced. The subtype loss weights are derived from the same numbers."""
    weights = np.array([sum(len(r) for r in rows) for rows in data.rows], dtype=np.float64)
    if class_balanced:
        for label in np.unique(data.labels):
            members = data.labels == label
            weights[members] /= weights[members].sum()
    return weights / weights.sum()


def training_tuples(data: PatientImages, count: int, rng: np.random.Generator,
                    class_balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`count` fresh random tuples and their patient positions, drawn by sampling_weights()."""
    patients = rng.choice(len(data), size=count, p=sampling_weights(data, class_balanced))
    tuples = np.full((count, len(data.rows[0])), -1, dtype=np.int64)
    for m in range(tuples.shape[1]):
        for i, p in enumerate(patients):
            rows = data.rows[p][m]
            if len(rows):
                tuples[i, m] = rows[rng.integers(len(rows))]
    return tuples, patients


def training_bags(data: PatientImages, count: int, bag_size: int, rng: np.random.Generator,
                  class_balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`count` bags of `bag_size` images of one patient (every magnification together), distinct
    where the patient has that many, patients drawn as for tuples. A patient with fewer images
    repeats some: a training bag has no empty slot, so the encoder (in training mode, with
    BatchNorm's batch statistics) never sees a black frame and needs no value-sized indexing."""
    patients = rng.choice(len(data), size=count, p=sampling_weights(data, class_balanced))
    bags = np.full((count, bag_size), -1, dtype=np.int64)
    for i, p in enumerate(patients):
        rows = data.rows[p][0]
        bags[i] = rng.choice(rows, size=bag_size, replace=len(rows) < bag_size)
    return bags, patients


def evaluation_bags(data: PatientImages, bag_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One bag per patient holding every image of it (padded with -1 to the largest patient);
    with `bag_size`, the fixed set of bags of that size (as in training) that covers every image:
    ceil(n / bag_size) bags of distinct images, the last one completed from the patient's first
    images (a patient with fewer images than bag_size gets one bag of all of them)."""
    if not bag_size:
        width = max(len(rows[0]) for rows in data.rows)
        bags = np.full((len(data), width), -1, dtype=np.int64)
        for p, rows in enumerate(data.rows):
            bags[p, :len(rows[0])] = rows[0]
        return bags, np.arange(len(data))
    bags, owners = [], []
    for p, rows in enumerate(data.rows):
        # A fixed shuffle mixes the magnifications in each bag, as the training draws do.
        images = np.asarray(rows[0])[np.random.default_rng(len(rows[0])).permutation(len(rows[0]))]
        for start in range(0, len(images), bag_size):
            bag = np.full(bag_size, -1, dtype=np.int64)
            chosen = np.resize(np.roll(images, -start), min(bag_size, len(images)))
            bag[:len(chosen)] = chosen
            bags.append(bag)
            owners.append(p)
    return np.array(bags, dtype=np.int64).reshape(-1, bag_size), np.array(owners)


def training_samples(data: PatientImages, count: int, rng: np.random.Generator, cfg) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's fresh random tuples, or bags for MIL models, and their patient positions."""
    if cfg.sample_mode == "bag":
        return training_bags(data, count, cfg.bag_size, rng, cfg.class_balanced)
    tuples, owners = training_tuples(data, count, rng, cfg.class_balanced)
    return drop_magnifications(tuples, cfg.magnification_dropout, rng), owners


def drop_magnifications(tuples: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each slot of a tuple masked with probability p, exactly as a missing magnification is
    at test (index -1: a black image and mask 0), never every present one of a tuple (such
    tuples are drawn again). The model then meets in training the incomplete inputs that
    magnification importance and predict.py ask it about."""
    if p <= 0 or tuples.shape[1] < 2:
        return tuples  # no draw at all: p = 0 leaves the epoch's random stream as it was
    out, redo = tuples.copy(), np.ones(len(tuples), dtype=bool)
    while redo.any():
        rows = np.flatnonzero(redo)
        dropped = np.where(rng.random((len(rows), tuples.shape[1])) < p, -1, tuples[rows])
        out[rows] = dropped
        redo[rows] = ~(dropped >= 0).any(axis=1) & (tuples[rows] >= 0).any(axis=1)
    return out


def evaluation_samples(data: PatientImages, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic evaluation tuples, or bags for MIL models: one whole bag per patient, or
    bags of --bag-size for the aggregators whose output depends on the bag's size."""
    if cfg.sample_mode != "bag":
        return evaluation_tuples(data)
    sized = cfg.model.removeprefix("mil_") in BAG_SIZED_AGGREGATORS
    return evaluation_bags(data, cfg.bag_size if sized else 0)


def evaluation_tuples(data: PatientImages) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic tuples covering every image at least once.

    A patient gets as many tuples as its largest magnification has images; tuple k takes
    image k mod n_m of magnification m.
    """
    tuples, owners = [], []
    for p, rows in enumerate(data.rows):
        depth = max(len(r) for r in rows)
        for k in range(depth):
            tuples.append([r[k % len(r)] if len(r) else -1 for r in rows])
            owners.append(p)
    return np.array(tuples, dtype=np.int64).reshape(-1, len(data.rows[0])), np.array(owners)


def tuples_per_epoch(data: PatientImages, cfg) -> int:
    """Default: as many tuples (or bags) as it takes to show each training image about once:
    the images over what a drawn tuple holds on average (sampling_weights' draw; before
    magnification dropout, which masks on purpose). A complete patient fills every slot, so on
    complete data that is images / magnifications; a patient with one magnification of two fills
    one, and dividing by the slot count would show an incomplete cohort's images 0.5-0.7 times an
    epoch. --tuples-per-epoch counts tuples of MMNet's four images: bags then get as many images."""
    requested = cfg.tuples_per_epoch
    if cfg.sample_mode == "bag":
        images = requested * len(MAGNIFICATIONS) if requested else sum(len(rows[0]) for rows in data.rows)
        return max(1, images // cfg.bag_size)
    if requested:
        return requested
    images = sum(len(r) for rows in data.rows for r in rows)
    filled_slots = np.array([sum(1 for r in rows if len(r)) for rows in data.rows], dtype=np.float64)
    per_tuple = round(float(sampling_weights(data, cfg.class_balanced) @ filled_slots), 6)
    return max(1, int(images // per_tuple))


def samples_for(cfg, tuples: int) -> int:
    """Samples in a step or pass of `tuples` (--batch-size, the micro-batch): that many tuples,
    or the bags holding as many images as that many MMNet tuples, so a step of every model
    sees about the same number of images and a pass fits the same memory."""
    if cfg.sample_mode != "bag":
        return tuples
    return max(1, tuples * len(MAGNIFICATIONS) // cfg.bag_size)
