"""A fold's predictions as frames: one row per evaluation tuple (or per patient bag for MIL
models) with identity, label and probabilities; for MIL models also each image's attention."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from config import slot_labels
from preprocess.dataset import PatientImages, evaluation_samples
from utils.engine.graphs import evaluation_graphs
from utils.engine.train import predict


def evaluation_batch(cfg, env) -> int:
    """Samples per evaluation pass: twice the training micro-batch of tuples (no gradients
    are kept), or one patient's whole bag for MIL models (encoded in chunks)."""
    return 1 if cfg.sample_mode == "bag" else env.micro_batch * 2


def prediction_frame(model, study, cfg, data: PatientImages, importance: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Predictions of a split, and the attention of every image for MIL models (else None).
    `importance`: also each magnification masked out of every tuple (plain views)."""
    env, tta = study.env, cfg.tta == "on"
    samples, owners = evaluation_samples(data, cfg)
    batch = evaluation_batch(cfg, env)
    graphs = evaluation_graphs(cfg.cuda_graphs, env.device, cfg.sample_mode)
    out = predict(model, study.source, samples, batch, env.amp_dtype, tta, graphs=graphs)
    frame = pd.DataFrame({"patient": np.array(data.patients)[owners], "group": np.array(data.groups)[owners],
                          "label": data.labels[owners], "subtype": data.subtypes[owners], "prob": out["prob"]})
    for i in range(out.get("subtype_prob", np.zeros((0, 0))).shape[1]):
        frame[f"p_sub_{i}"] = out["subtype_prob"][:, i]
    labels = [label.lower() for label in slot_labels(cfg)]
    for i, label in enumerate(labels if "mag_weights" in out else ()):  # left out where the fusion has none
        frame[f"w_{label}"] = out["mag_weights"][:, i]
    pairs = [(q, k) for q in range(1, len(labels)) for k in range(q + 1)] if "hierarchy_weights" in out else []
    for level, onto in pairs:  # level's attention on onto (itself when equal); undefined where level's image is missing
        frame[f"h_{labels[level]}_{labels[onto]}"] = np.where(samples[:, level] >= 0, out["hierarchy_weights"][:, level, onto], np.nan)
    if importance and cfg.sample_mode == "tuple" and len(labels) > 1:
        # What each magnification contributes: the plain view of the whole tuple against the
        # plain view with that magnification masked out (no averaging over flips needed).
        frame["prob_plain"] = out["prob_plain"]
        for i, label in enumerate(labels):
            masked = samples.copy()
            masked[:, i] = -1
            frame[f"prob_without_{label}"] = predict(model, study.source, masked, batch, env.amp_dtype, False, graphs=graphs)["prob"]
    attention = None
    if "instance_weights" in out:
        attention = attention_frame(study.index, data, (samples, owners), out["instance_weights"])
    return frame, attention


def attention_frame(index: pd.DataFrame, data: PatientImages, bags: tuple[np.ndarray, np.ndarray],
                    weights: np.ndarray) -> pd.DataFrame:
    """One row per image of a patient: patient, magnification, file, attention (summing to 1
    per patient: an image's weights over the patient's bags, divided by their number) and its
    rank within the patient (1 = most attended). `bags`: (bags, the patient of each bag)."""
    samples, owners = bags
    present = samples >= 0
    patient_of = np.repeat(owners, present.sum(axis=1))
    frame = pd.DataFrame({"patient": np.array(data.patients)[patient_of], "row": samples[present],
                          "attention": weights[present]})
    frame = frame.groupby(["patient", "row"], sort=False, as_index=False)["attention"].sum()
    frame["attention"] /= frame["patient"].map(pd.Series(np.array(data.patients)[owners]).value_counts())
    rows = frame["row"].to_numpy()
    frame.insert(2, "mag", index["mag"].to_numpy()[rows])
    frame.insert(3, "image", [Path(p).name for p in index["path"].to_numpy()[rows]])
    frame["rank"] = frame.groupby("patient")["attention"].rank(ascending=False, method="first").astype(int)
    return frame
