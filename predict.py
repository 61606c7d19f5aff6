"""Predict patients from folders of images and print JSON. For research use only: not a
diagnostic device, and not validated for clinical decisions.

    python predict.py --run-dir output --patient-dir DIR [DIR ...] [--experiment mmnet] [--cam fig.png]
    python predict.py --checkpoint output/models/mmnet/fold0.pt --patient-dir DIR

A folder may hold any subset of the four magnifications (PNG, JPEG or TIFF). A file's
magnification comes from its BreakHis name, else from a 40X/100X/200X/400X folder above it.
With --run-dir the fold models form an ensemble: mean probability and threshold, with each
model's probability and their spread. One folder prints one JSON object, several a list.
--cam draws the ensemble's Grad-CAM (the maps of every fold model, averaged) of the first
tuple (for MIL models, of the bag of the first 4 images); with several folders, one figure per
folder (name-<folder>.png). MIL fold models (--experiment mil_attention, ...) read all of a
folder's images as one bag.

    python predict.py --run-dir output --export onnx              # output/export/mmnet/fold<k>.onnx + .json
    python predict.py --run-dir output --runtime onnx --patient-dir DIR

--export onnx writes each kept fold model as an ONNX graph (uint8 frames and mask in, the
evaluation's probabilities out: stain and pixel normalisation and the test-time views inside)
with a JSON of what it expects; --runtime onnx scores with ONNX Runtime instead of PyTorch
(pip install -r requirements-export.txt).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from preprocess.dataset import ImageSource, evaluation_samples
from preprocess.patient_folder import cohort_folders, load_patient
from utils.device import resolve_device
from utils.engine.export import export_run, load_onnx_models
from utils.engine.inference import (
    MIL_SHOWN,
    ensemble_explanation,
    fold_checkpoints,
    load_fold_model,
    magnification_of_rows,
    patient_data,
    predict_patient,
)
from utils.report.conformal import DECISION_FILE, decide
from utils.report.external import external_report, scored_frame
from utils.report.gradcam_figures import patient_figure

RESEARCH_ONLY = "research use only: not a diagnostic device and not validated for clinical decisions"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one fold's model, e.g. output/models/mmnet/fold0.pt")
    source.add_argument("--run-dir", help="an output directory: every fold model under its models/<experiment>/, as an ensemble")
    parser.add_argument("--experiment", default="mmnet")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--patient-dir", nargs="+", help="one folder of images per patient")
    target.add_argument("--cohort", help="an external cohort: every patient folder under DIR is scored and an "
                                         "external-validation report written to <run-dir>/external/<name>/")
    parser.add_argument("--labels", help="with --cohort: CSV of patient,label (else BreakHis folder names give the label)")
    parser.add_argument("--cohort-name", help="the report's folder name (default: the cohort folder's name)")
    parser.add_argument("--cam", help="write the ensemble's Grad-CAM figure of the patient's first tuple here")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto: CUDA, else MPS, else the CPU; AMP (bf16/fp16) where the device has it")
    parser.add_argument("--conformal-alpha", type=float, default=None,
                        help="per-class error rate of the conformal set (default: the run's --conformal-alpha)")
    parser.add_argument("--max-tuples", type=int, default=0,
                        help="score at most K tuples (bags) per patient and model, for a bounded latency; 0 = all")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="off",
                        help="on (CUDA, PyTorch models): each fold model's forward recorded once per tuple bucket "
                             "and replayed, one launch per model and patient after the first patients")
    parser.add_argument("--export", choices=("onnx",), help="write the fold models as ONNX graphs to <run-dir>/export/<experiment>/")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                        help="onnx: score with ONNX Runtime from the exported graphs (--run-dir only)")
    args = parser.parse_args(argv)
    if not args.export and not (args.patient_dir or args.cohort):
        parser.error("one of --patient-dir, --cohort or --export is required")
    if args.cuda_graphs == "on" and args.runtime == "onnx":
        parser.error("--cuda-graphs on records PyTorch models: leave it off with --runtime onnx")
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.export:
        return run_export(args)
    if args.cohort:
        return run_cohort(args)
    folders = [Path(p) for p in args.patient_dir]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"patient folder '{folder}' does not exist")
    started = time.perf_counter()
    models = _fold_models(args)
    load_ms = 1000 * (time.perf_counter() - started)
    results = []
    for folder in folders:
        cam = None
        if args.cam:
            cam = Path(args.cam) if len(folders) == 1 else Path(args.cam).with_name(
                f"{Path(args.cam).stem}-{folder.name}{Path(args.cam).suffix}")
        result = predict_folder(models, folder, cam, args.device, args.max_tuples, args.graphs)
        results.append({**result, **_decision(args, models, result), "load_ms": round(load_ms, 1)})
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def _graphs(args) -> bool:
    """--cuda-graphs on where it can be: PyTorch models on CUDA (args.device resolved); said once."""
    if args.cuda_graphs == "on" and args.device != "cuda":
        print(f"note: --cuda-graphs on needs CUDA (this run: {args.device}); the models run eagerly", file=sys.stderr)
    return args.cuda_graphs == "on" and args.device == "cuda"


def run_export(args) -> int:
    models = _fold_models(args)
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.checkpoint).resolve().parents[2]
    started = time.perf_counter()
    graphs = export_run(models, run_dir, args.experiment)
    print(json.dumps({"exported": [str(g) for g in graphs], "descriptions": [str(g.with_suffix(".json")) for g in graphs],
                      "seconds": round(time.perf_counter() - started, 1), "note": RESEARCH_ONLY}, indent=2))
    return 0


def _fold_models(args) -> list:
    """The checkpoint's model, or every fold model of the run, on the resolved device
    (args.device is resolved in place: what runs after it uses the same device); with
    --runtime onnx, the run's exported graphs in ONNX Runtime sessions."""
    if args.runtime == "onnx":
        if not args.run_dir or args.cam:
            raise ValueError("--runtime onnx reads a run's exported graphs: pass --run-dir (and no --cam: "
                             "Grad-CAM needs the PyTorch models)")
        args.device, args.graphs = resolve_device(args.device), False
        return load_onnx_models(args.run_dir, args.experiment, args.device)
    paths = [Path(args.checkpoint)] if args.checkpoint else fold_checkpoints(args.run_dir, args.experiment)
    if not paths or not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"no checkpoint found ({args.checkpoint or args.run_dir}); train with "
                                f"`python main.py` first or pass --checkpoint PATH")
    args.device = resolve_device(args.device)
    args.graphs = _graphs(args)
    return [load_fold_model(p, args.device) for p in paths]


def _decision(args, models, result: dict) -> dict:
    """The calibrated probability, conformal set and decision of a scored patient, from the run's
    decision_calibration.json (written with its report), for the input this patient has."""
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.checkpoint).resolve().parents[2]
    stored = json.loads((run_dir / DECISION_FILE).read_text()).get(args.experiment) if (
        run_dir / DECISION_FILE).is_file() else None
    if stored is None:
        return {"conformal_note": f"no {DECISION_FILE} for '{args.experiment}' in {run_dir}: rebuild the "
                                  f"report (python main.py --report-only --output-dir {run_dir})"}
    cfg = models[0].cfg
    present = {f"{m}X" for m in cfg.magnifications if result["images_used"].get(f"{m}X")}
    missing = [f"{m}x" for m in cfg.magnifications if f"{m}X" not in present] if cfg.sample_mode == "tuple" else []
    return decide(stored, result["malignant_probability"], missing, args.conformal_alpha)


def run_cohort(args) -> int:
    """Every patient of an external cohort through the fold-model ensemble, then its report."""
    root = Path(args.cohort)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort folder '{root}' does not exist")
    if not args.run_dir:
        raise ValueError("--cohort scores the ensemble of a run's fold models: pass --run-dir OUTPUT")
    patients, unscored = cohort_folders(root, Path(args.labels) if args.labels else None)
    if not patients:
        raise ValueError(f"no patient folder under '{root}': name them like BreakHis (SOB_B_A_14-22549AB) or pass --labels CSV")
    models = _fold_models(args)
    rows = []
    for patient in patients:
        try:
            result = predict_folder(models, patient["folder"], None, args.device, args.max_tuples, args.graphs)
        except ValueError as exc:  # no usable image, or none of a magnification the models use
            unscored.append({"patient": patient["patient"], "reason": str(exc)})
            continue
        rows.append({"patient": patient["patient"], "group": patient["group"], "label": patient["label"],
                     "prob": result["malignant_probability"], "threshold": result["threshold"],
                     "decision": result["decision"], "images": sum(result["images_used"].values()),
                     "conformal_decision": _decision(args, models, result).get("conformal_decision")})
    out = Path(args.run_dir) / "external" / (args.cohort_name or root.name)
    report = external_report(scored_frame(rows), unscored, out, f"{args.experiment} on {root.name}")
    print(json.dumps({"report": str(report), "patients_scored": len(rows), "not_scored": len(unscored),
                      "models": len(models), "note": RESEARCH_ONLY}, indent=2))
    return 0


def predict_folder(models, folder: Path, cam: Path | None, device: str, max_tuples: int = 0,
                   graphs: bool = False) -> dict:
    started = time.perf_counter()
    # --max-tuples K: only the files the first K tuples read are decoded (a MIL bag reads every image)
    cache, by_mag, skipped = load_patient(folder, models[0].cfg.image_size,
                                          per_magnification=max_tuples if models[0].cfg.sample_mode != "bag" else 0)
    decode_ms = 1000 * (time.perf_counter() - started)
    if not by_mag:
        raise ValueError(f"no usable image in '{folder}' ({len(skipped)} file(s) skipped): "
                         f"expected PNG, JPEG or TIFF images of 40X/100X/200X/400X")
    result = {"patient_dir": str(folder), **predict_patient(models, cache, by_mag, device, max_tuples, graphs),
              "images_used": {f"{m}X": len(rows) for m, rows in sorted(by_mag.items())},
              "skipped": skipped, "decode_ms": round(decode_ms, 1), "note": RESEARCH_ONLY}
    if cam is not None:
        tuples, _ = evaluation_samples(patient_data(by_mag, models[0].cfg), models[0].cfg)
        title = f"{folder.name}: ensemble of {len(models)} model(s)"
        source = ImageSource(cache, device, mags=magnification_of_rows(by_mag, len(cache)))
        if models[0].cfg.sample_mode == "bag":  # MIL: the decision on the bag of the first images, drawn
            tuples, title = tuples[:, :MIL_SHOWN], f"{title}, bag of its first {MIL_SHOWN} images"
        explanation = ensemble_explanation(models, source, tuples[0], title)
        result["cam"] = str(patient_figure(explanation, cam))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
