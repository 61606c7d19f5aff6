"""Fold models as ONNX graphs served by ONNX Runtime (predict.py --export onnx, --runtime onnx).

A graph takes what a lab has after decoding, uint8 frames and their mask, and returns what the
evaluation computes: the fold's stain normalisation, the backbone's pixel normalisation, the
test-time views and the heads all run inside it, through the same code as PyTorch evaluation
(views_forward, view_means). A JSON beside each graph states the rest: input size and
layout, magnification slots, the stain reference, the decision threshold and the fold's config.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config, slot_labels
from preprocess.image_source import ImageSource, reads_levels
from preprocess.preprocess import frame_shape
from utils.engine.train import view_means, views_forward
from utils.files import atomic_write_text

EXPORT_DIR = "export"  # <run-dir>/export/<experiment>/fold<k>.onnx and fold<k>.json
OUTPUTS = ("prob", "subtype_prob", "mag_weights")  # in this order, those the model gives
NEEDS = "pip install -r requirements-export.txt"


class ServedModel(torch.nn.Module):
    """One fold model's evaluation of a batch of gathered frames, as one graph."""

    def __init__(self, model: torch.nn.Module, tta: bool, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.tta, self.outputs = model, tta, outputs

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        out = view_means(views_forward(self.model, images, mask, ("none", self.tta, True)), self.tta)
        return tuple(out[name] for name in self.outputs)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"ONNX needs {', '.join(missing)}: {NEEDS}")


def _example(cfg: Config, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the traced shapes (batch 2: torch.export specialises sizes 0 and 1), one slot of
    the first tuple empty when there are several, as a missing magnification is."""
    slots, (height, width) = len(slot_labels(cfg)), frame_shape(cfg.image_size)
    images = torch.randint(0, 256, (batch, slots, height, width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, slots)
    if slots > 1:
        images[0, 0], mask[0, 0] = 0, 0
    return images, mask


def export_fold_model(fm, folder: Path) -> Path:
    """fold<k>.onnx and fold<k>.json of one loaded fold model (utils.engine.inference.FoldModel)."""
    _require("onnx", "onnxscript")
    if "dynamo" not in torch.onnx.export.__code__.co_varnames:
        raise ValueError(f"ONNX export needs torch 2.5 or newer (its dynamo exporter); this is torch {torch.__version__}")
    if reads_levels(fm.model):
        raise ValueError(f"{fm.path}: MIL bags (sample_mode bag) are served by PyTorch only; export a tuple or "
                         f"single-image model (mmnet, single_*, simple_concat, pooled_single)")
    model = fm.model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    images, mask = _example(fm.cfg)
    with torch.no_grad():
        given = view_means(views_forward(model, images, mask, ("none", False, True)), False)
    outputs = tuple(name for name in OUTPUTS if name in given)
    served = ServedModel(model, fm.cfg.tta == "on", outputs).eval()
    folder.mkdir(parents=True, exist_ok=True)
    graph = folder / f"{fm.path.stem}.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(served, (images, mask), str(graph), input_names=["images", "mask"], output_names=list(outputs),
                      dynamo=True, dynamic_shapes={"images": {0: batch}, "mask": {0: batch}}, optimize=False,
                      external_data=False, verbose=False)
    atomic_write_text(graph.with_suffix(".json"), json.dumps(_description(fm, model, graph, outputs), indent=2))
    return graph


def _description(fm, model: torch.nn.Module, graph: Path, outputs: tuple[str, ...]) -> dict:
    """What a consumer of the graph must know: everything outside it, and what it does inside."""
    cfg, labels = fm.cfg, slot_labels(fm.cfg)
    height, width = frame_shape(cfg.image_size)
    stain = getattr(model, "stain", None)
    return {
        "graph": graph.name, "checkpoint": str(fm.path), "threshold": fm.threshold,
        "inputs": {
            "images": {"dtype": "uint8", "shape": ["batch", len(labels), height, width, 3],
                       "layout": f"RGB, channels last; each image the whole frame resized to {height} x {width} "
                                 f"(height x width, bicubic; a 700x460 BreakHis frame keeps its aspect); slot m holds "
                                 f"an image of slots[m]; an empty slot is all zero"},
            "mask": {"dtype": "float32", "shape": ["batch", len(labels)], "values": "1 where the slot holds an image, 0 where not"},
        },
        "slots": labels, "image_size": cfg.image_size, "frame": [height, width],
        "inside_graph": ["pixels / 255", f"stain normalisation: {cfg.stain_method()} onto the fold's reference",
                         "(pixels - pixel_mean) / pixel_std", "test-time views (plain, mirrors, 180-degree turn) averaged"
                         if cfg.tta == "on" else "the plain view only (tta off)", "sigmoid (prob), softmax (subtype_prob)"],
        "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
        "stain_norm": cfg.stain_method(),
        "stain_reference": {k: v.tolist() for k, v in stain.state_dict().items()} if stain is not None else None,
        "outputs": {name: OUTPUT_MEANING[name] for name in outputs},
        "patient": "tuples as predict.py builds them (one per image of the most imaged magnification, the others "
                   "cycled); the patient's probability is the mean of prob over its tuples, then over the fold models; "
                   "malignant when it reaches the mean threshold",
        "config": dataclasses.asdict(cfg),
    }


OUTPUT_MEANING = {"prob": "(batch,) malignant probability of each tuple",
                  "subtype_prob": "(batch, 8) subtype probabilities, config SUBTYPES order",
                  "mag_weights": "(batch, slots) share of each magnification in the fusion (0 where empty)"}


@dataclass
class OnnxFoldModel:
    """An exported fold model as the predictor uses a FoldModel: cfg, threshold and predict()."""
    session: object
    cfg: Config
    threshold: float
    path: Path
    outputs: tuple[str, ...]

    def predict(self, source: ImageSource, tuples: np.ndarray, amp_dtype: str, graphs: bool = False) -> dict:
        """FoldModel.predict()'s outputs from the session (graphs: predict.py refuses them with ONNX)."""
        images, mask = source.gather(tuples)
        values = self.session.run(list(self.outputs), {"images": images.cpu().numpy(), "mask": mask.cpu().numpy()})
        return dict(zip(self.outputs, values))


def load_onnx_models(run_dir: str | Path, experiment: str, device: str = "cpu") -> list[OnnxFoldModel]:
    """Every exported fold model of an experiment, as ONNX Runtime sessions (CUDA where asked
    for and available, else the CPU)."""
    _require("onnxruntime")
    import onnxruntime as ort

    folder = Path(run_dir) / EXPORT_DIR / experiment
    described = sorted(folder.glob("fold*.json"), key=lambda p: int(p.stem.removeprefix("fold")))
    if not described:
        raise FileNotFoundError(f"no exported model in {folder}: run python predict.py --run-dir {run_dir} "
                                f"--experiment {experiment} --export onnx first")
    providers = ["CUDAExecutionProvider"] if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() else []
    fields = {f.name for f in dataclasses.fields(Config)}
    models = []
    for path in described:
        meta = json.loads(path.read_text())
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items() if k in fields}
        session = ort.InferenceSession(str(folder / meta["graph"]), providers=providers + ["CPUExecutionProvider"])
        models.append(OnnxFoldModel(session, Config(**values), float(meta["threshold"]), path, tuple(meta["outputs"])))
    return models


def export_run(models: list, run_dir: str | Path, experiment: str) -> list[Path]:
    """Each loaded fold model of the experiment as a graph under <run-dir>/export/<experiment>/."""
    folder = Path(run_dir) / EXPORT_DIR / experiment
    return [export_fold_model(fm, folder) for fm in models]
