"""Trained fold models: loading, patient-level prediction, and the Grad-CAM maps of a run's
test patients (saved as .npz under output/gradcam/; the report draws them)."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from backbones import build_model
from backbones.encoder import fingerprint, frozen_encoder
from backbones.our.gradcam import attention_maps, cam_maps
from config import MAGNIFICATIONS, SUBTYPE_NAMES, SUBTYPES, Config, slot_labels
from preprocess.augment import model_input
from preprocess.dataset import ImageSource, PatientImages, evaluation_samples, evaluation_tuples, fold_split, reads_levels
from utils.device import auto_amp
from utils.engine.checkpoint import load_saved_state
from utils.engine.graphs import graph_bucket
from utils.engine.saving import load_checkpoint
from utils.engine.train import padded, predict_samples
from utils.files import ATTENTION_FILE, GRADCAM_DIR, MODELS_DIR, run_folder, steps
from utils.metrics import DECISION_THRESHOLD, patient_probabilities

log = logging.getLogger("mmnet")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


@dataclass
class FoldModel:
    model: torch.nn.Module
    cfg: Config
    threshold: float
    path: Path

    def predict(self, source: ImageSource, tuples: np.ndarray, amp_dtype: str, graphs: bool = False) -> dict:
        """predict_samples() of these tuples: the evaluation's probabilities, averaged over views;
        graphs: tuples padded to a bucket (graph_bucket) and the forward recorded per bucket."""
        kept = len(tuples)
        if graphs:
            tuples = padded(tuples, graph_bucket(kept))
        out = predict_samples(self.model, source, tuples, (amp_dtype, self.cfg.tta == "on", graphs))
        return {key: value[:kept] for key, value in out.items()}


def load_fold_model(checkpoint: str | Path, device: str = "cpu") -> FoldModel:
    """Rebuild a model from best.pt alone (its config travels inside); threshold from results.json."""
    checkpoint = Path(checkpoint)
    payload = load_checkpoint(checkpoint, device)
    if "config_json" not in payload:
        raise ValueError(f"{checkpoint} holds no config: pass a best.pt written by main.py")
    values = {"stain_norm": "none", **json.loads(payload["config_json"])}  # a model from before --stain-norm had none
    if not values.get("freeze_backbone"):  # the file holds every weight; a frozen encoder is rebuilt
        values.update(pretrained="off", pretrained_file="")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in CONFIG_FIELDS}
    cfg = Config(**{**values, "device": device})
    model = build_model(cfg)
    load_saved_state(model, payload["model"])
    check_encoder(model, payload, checkpoint)
    results = _results_of(checkpoint)
    threshold = json.loads(results.read_text())["threshold"] if results.is_file() else DECISION_THRESHOLD
    return FoldModel(model.to(device).to(memory_format=torch.channels_last).eval(), cfg, float(threshold), checkpoint)


def check_encoder(model: torch.nn.Module, payload: dict, checkpoint: Path) -> None:
    """The rebuilt frozen encoder must be the one the fold model was trained on."""
    saved = payload.get("encoder")
    if saved is None:
        return
    found = fingerprint(frozen_encoder(model))
    if found != saved["fingerprint"]:
        raise ValueError(f"{checkpoint} was trained on {saved['backbone']} weights {saved['fingerprint'][:12]}, "
                         f"but the weights loaded now are {found[:12]}: pass the same --pretrained-file "
                         f"(or hub weights) as the run")


def _results_of(checkpoint: Path) -> Path:
    """results.json of a kept model (models/<experiment>/fold<k>.pt -> runs/<experiment>/fold<k>/),
    or beside a checkpoint still in its run folder."""
    if checkpoint.parent.parent.name == MODELS_DIR:
        return run_folder(checkpoint.parent.parent.parent, checkpoint.parent.name, _fold_of(checkpoint)) / "results.json"
    return checkpoint.parent / "results.json"


def _fold_of(checkpoint: Path) -> int:
    return int(checkpoint.stem.removeprefix("fold"))


def fold_checkpoints(output_dir: str | Path, experiment: str = "mmnet") -> list[Path]:
    """The kept model of every finished fold of an experiment, in fold order."""
    return sorted(Path(output_dir, MODELS_DIR, experiment).glob("fold*.pt"), key=_fold_of)


def patient_data(images_by_mag: dict[int, list[int]], cfg: Config) -> PatientImages:
    """One patient's cache rows as PatientImages in the model's magnification layout."""
    if cfg.sample_mode in ("pooled", "bag"):
        rows = [np.array(sorted(r for m in cfg.magnifications for r in images_by_mag.get(m, [])))]
    else:
        rows = [np.array(images_by_mag.get(m, []), dtype=np.int64) for m in cfg.magnifications]
    return PatientImages(["patient"], np.zeros(1, np.int64), np.zeros(1, np.int64), ["0"], [rows])


def magnification_of_rows(images_by_mag: dict[int, list[int]], rows: int) -> np.ndarray:
    """The magnification of each cache row (what MIL models read for their embedding)."""
    mags = np.full(rows, 40)
    for mag, members in images_by_mag.items():
        mags[list(members)] = mag
    return mags


@torch.no_grad()
def predict_patient(models: list[FoldModel], cache: np.ndarray, images_by_mag: dict[int, list[int]],
                    device: str = "cpu", max_tuples: int = 0, graphs: bool = False) -> dict:
    """Mean over tuples (each the mean of its test-time views, as in evaluation), then over fold
    models: probability, subtypes, magnification weights. All of a patient's tuples go through
    a model in one batch, under the device's autocast dtype; `max_tuples` > 0 scores only the
    first that many (every image of a magnification is in the first tuples that reach it).
    graphs (predict.py --cuda-graphs on, on CUDA): each tuple model's forward recorded per tuple
    bucket (a MIL bag's width changes with its patient: run eagerly)."""
    source = ImageSource(cache, device, mags=magnification_of_rows(images_by_mag, len(cache)))
    amp_dtype = auto_amp(device)
    means, tuples_used = [], 0
    started = time.perf_counter()
    for fm in models:
        data = patient_data(images_by_mag, fm.cfg)
        if not any(len(r) for r in data.rows[0]):
            continue
        tuples, _ = evaluation_samples(data, fm.cfg)
        tuples = tuples[:max_tuples] if max_tuples > 0 else tuples
        out = fm.predict(source, tuples, amp_dtype, graphs=graphs and fm.cfg.sample_mode != "bag")
        means.append({key: out[key].mean(0) for key in ("prob", "mag_weights", "subtype_prob") if key in out})
        tuples_used += len(tuples)
    means = on_host(means)  # one copy (one sync) for the whole patient, whatever the number of models
    probs = [float(m["prob"]) for m in means]
    weights = [m["mag_weights"] for m in means if "mag_weights" in m]
    subtypes = [m["subtype_prob"] for m in means if "subtype_prob" in m]
    if not probs:
        raise ValueError("no image of a magnification the model uses")
    result = {"malignant_probability": round(float(np.mean(probs)), 4),
              # one value per fold model: how much the ensemble's members disagree
              "model_probabilities": [round(p, 4) for p in probs],
              "probability_sd": round(float(np.std(probs)), 4),
              "threshold": round(float(np.mean([m.threshold for m in models])), 4),
              "magnification_weights": dict(zip(slot_labels(models[0].cfg), np.mean(weights, 0).astype(float).round(4).tolist()))
              if weights else None,
              "tuples_per_model": tuples_used // len(probs), "models": len(probs),
              "milliseconds": round(1000 * (time.perf_counter() - started), 2)}
    if subtypes:
        mean = np.mean(subtypes, 0)
        result["subtype_probabilities"] = {SUBTYPE_NAMES[c]: round(float(p), 4) for c, p in zip(SUBTYPES, mean)}
    result["decision"] = "malignant" if result["malignant_probability"] >= result["threshold"] else "benign"
    return result


def on_host(outputs: list[dict]) -> list[dict]:
    """Dicts of model outputs (torch on any device, or ONNX Runtime's numpy) as numpy, the torch
    ones brought over in a single copy: one synchronisation, not one per value."""
    keys = [(i, key) for i, out in enumerate(outputs) for key, value in out.items() if isinstance(value, torch.Tensor)]
    if keys:
        flat = torch.cat([outputs[i][key].float().reshape(-1) for i, key in keys]).cpu().numpy()
        start = 0
        for i, key in keys:
            size = outputs[i][key].numel()
            outputs[i][key] = flat[start:start + size].reshape(tuple(outputs[i][key].shape))
            start += size
    return [{key: np.asarray(value, dtype=np.float32) for key, value in out.items()} for out in outputs]


def tuple_inputs(model: torch.nn.Module, source: ImageSource, tuple_rows: np.ndarray):
    """Normalised (1, M, 3, H, W) input, mask and the raw uint8 images of one tuple (or bag)."""
    images, mask = source.gather(tuple_rows[None], reads_levels(model))
    return model_input(images, model), mask, images[0].cpu().numpy()


def explain_tuple(fm: FoldModel, source: ImageSource, tuple_rows: np.ndarray, title: str,
                  target: int | None = None, labels: list[str] | None = None) -> dict:
    """Images, Grad-CAM of the predicted class (or of `target`) and spatial attention of one
    tuple (or bag: `labels` name its images), with the caption facts (probability, threshold,
    magnification weights)."""
    x, mask, raw = tuple_inputs(fm.model, source, tuple_rows)
    attention, prob, weights = attention_maps(fm.model, x, mask)
    target = int(prob >= fm.threshold) if target is None else target
    labels = labels or (image_labels(source, tuple_rows) if reads_levels(fm.model) else slot_labels(fm.cfg))
    explanation = {"images": raw, "present": mask[0].cpu().numpy() > 0,
                   "cams": cam_maps(fm.model, x, mask, "gradcam", target=target),
                   "labels": np.array(labels), "title": np.array(_caption(title, prob, fm.threshold, slot_labels(fm.cfg), weights)),
                   "prob": np.array(prob), "weights": np.asarray(weights, dtype=float)}
    if attention is not None:
        explanation["attention"] = attention
    return explanation


def image_labels(source: ImageSource, rows: np.ndarray) -> list[str]:
    """'40X'.. per image of a MIL bag (from the magnification codes the source holds)."""
    return [f"{MAGNIFICATIONS[code - 1]}X" for code in source.levels[rows]]


def _caption(title: str, prob: float, threshold: float, labels, weights) -> str:
    target = "malignant" if prob >= threshold else "benign"
    weights_text = ", ".join(f"{label} {w:.2f}" for label, w in zip(labels, weights)) if len(weights) else \
        "none (this fusion mixes the magnifications inside its vector)"
    return (f"{title}\nP(malignant) {prob:.2f} at threshold {threshold:.2f} -> {target} "
            f"(Grad-CAM of that class) | weights {weights_text}")


def ensemble_explanation(models: list[FoldModel], source: ImageSource, tuple_rows: np.ndarray, title: str) -> dict:
    """The explanation of the ensemble's decision: every fold model's Grad-CAM of the class the
    ensemble chose, averaged (as are attention, probability and weights)."""
    x, mask, _ = tuple_inputs(models[0].model, source, tuple_rows)
    prob = float(np.mean([attention_maps(fm.model, x, mask)[1] for fm in models]))
    threshold = float(np.mean([fm.threshold for fm in models]))
    parts = [explain_tuple(fm, source, tuple_rows, title, target=int(prob >= threshold)) for fm in models]
    merged = dict(parts[0])
    for key in ("cams", "attention", "weights"):
        if key in merged:
            merged[key] = np.mean([p[key] for p in parts], axis=0)
    merged["prob"] = np.array(prob)
    merged["title"] = np.array(_caption(f"{title} (maps averaged over the models)", prob, threshold,
                                        slot_labels(models[0].cfg), merged["weights"]))
    return merged


def choose_cases(predictions: pd.DataFrame, threshold: float, count: int) -> list[tuple[str, str]]:
    """(case, patient) for the most confident TP, TN, FP, FN of a fold, in that order."""
    patients = patient_probabilities(predictions).set_index("patient")
    patients["pred"] = (patients["prob"] >= threshold).astype(int)
    cases = []
    for case, label, pred, most in (("TP", 1, 1, True), ("TN", 0, 0, False), ("FP", 0, 1, True),
                                    ("FN", 1, 0, False)):
        part = patients[(patients["label"] == label) & (patients["pred"] == pred)]
        if len(part):
            cases.append((case, part["prob"].idxmax() if most else part["prob"].idxmin()))
    return cases[:count]


MIL_SHOWN, MIL_CONTEXT = 4, 64  # images drawn per MIL patient; most-attended images the maps are taken in


def _mil_explanation(fm: FoldModel, source, attention: pd.DataFrame, patient: str, title: str) -> dict:
    """A MIL patient: Grad-CAM of the patient's decision on its most-attended images (the bag
    of its MIL_CONTEXT most attended images, so memory stays bounded), the top MIL_SHOWN drawn.
    `attention`: the fold's attention.csv."""
    images = attention[attention["patient"] == patient]
    top = images.sort_values("rank").head(MIL_CONTEXT)
    labels = [f"{m}X, attention {a:.2f}" for m, a in zip(top["mag"], top["attention"])]
    explanation = explain_tuple(fm, source, top["row"].to_numpy(), f"{title}, its {min(len(top), MIL_SHOWN)} most "
                                f"attended of {len(images)} images", labels=labels)
    keep = slice(0, MIL_SHOWN)
    for key in ("images", "present", "cams", "labels"):
        explanation[key] = explanation[key][keep]
    return explanation


def write_gradcam_maps(cfg: Config, study, experiment: str = "mmnet") -> list[Path]:
    """Per fold: maps of the TP / TN / FP / FN test patients (as available), one .npz each;
    for MIL models the patient's most-attended images. A fold whose maps are newer than its
    model keeps them (a rerun of a finished study)."""
    written, maps_dir = [], Path(cfg.output_dir) / GRADCAM_DIR
    checkpoints = fold_checkpoints(cfg.output_dir, experiment)
    for checkpoint in steps(checkpoints, f"Grad-CAM {experiment}", len(checkpoints)):
        fold = _fold_of(checkpoint)
        kept = list(maps_dir.glob(f"{experiment}_fold{fold}_*.npz"))
        if kept and min(p.stat().st_mtime for p in kept) >= checkpoint.stat().st_mtime:
            written += kept
            continue
        for stale in kept:
            stale.unlink()
        fm = load_fold_model(checkpoint, str(study.source.device))
        run_dir = run_folder(cfg.output_dir, experiment, fold)
        predictions = pd.read_csv(run_dir / "predictions.csv")
        test = fold_split(study.index, study.usable, study.folds, fold, fm.cfg)["test"]
        tuples, owners = evaluation_tuples(test)
        attention = pd.read_csv(run_dir / ATTENTION_FILE) if fm.cfg.sample_mode == "bag" else None
        for case, patient in choose_cases(predictions, fm.threshold, cfg.gradcam_patients):
            label = "malignant" if test.labels[test.patients.index(patient)] else "benign"
            title = f"{patient} ({label}, {case}, fold {fold})"
            if fm.cfg.sample_mode == "bag":
                explanation = _mil_explanation(fm, study.source, attention, patient, title)
            else:
                explanation = explain_tuple(fm, study.source, tuples[owners == test.patients.index(patient)][0], title)
            path = maps_dir / f"{experiment}_fold{fold}_{case}_{patient}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **explanation)
            written.append(path)
    log.info("Grad-CAM %s: maps of %d patient(s) in %s", experiment, len(written), maps_dir)
    return written
