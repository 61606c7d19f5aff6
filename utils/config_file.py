"""Run configuration as a YAML file and as flags, and the validation messages both share.

Every problem is one line: `[CODE] key: what is wrong; what to do`. The codes are stable and
listed in the README, so a script or a person can look them up:

    CFG001 unknown key                CFG005 unknown experiment or group
    CFG002 wrong type                 CFG006 unknown backbone
    CFG003 out of range               CFG007 unreadable file or not a mapping
    CFG004 not one of the choices     CFG008 magnification not in BreakHis
                                      CFG009 optional package missing
                                      CFG010 options that do not combine
                                      CFG011 storage a Ray node cannot see
                                      CFG012 a Ray node runs other code
                                      CFG013 a --select grid it cannot run
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path

import yaml

from utils.experiments import FUSIONS, MAX_COMBINATIONS, NOT_SELECTABLE, parse_grid, typed_value

CODES = {
    "CFG001": "unknown key", "CFG002": "wrong type", "CFG003": "out of range",
    "CFG004": "not one of the choices", "CFG005": "unknown experiment or group",
    "CFG006": "unknown backbone", "CFG007": "unreadable file or not a mapping",
    "CFG008": "magnification not in BreakHis", "CFG009": "optional package missing",
    "CFG010": "options that do not combine", "CFG011": "storage a Ray node cannot see",
    "CFG012": "a Ray node runs other code", "CFG013": "a --select grid it cannot run",
}


def problem(code: str, key: str, text: str) -> str:
    return f"[{code}] {key}: {text}"


def closest(word: str, valid) -> str:
    """'; did you mean X?' for the nearest valid word, or '' when none is near."""
    match = difflib.get_close_matches(str(word), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def read_yaml(path: str | Path) -> tuple[dict, list[str]]:
    """The mapping in a YAML file and the problems reading it (CFG007)."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return {}, [problem("CFG007", str(path), f"cannot read it ({type(exc).__name__}: {exc}); "
                            f"pass a YAML file of Config keys, e.g. output/config.yaml")]
    if values is None:
        return {}, []
    if not isinstance(values, dict):
        return {}, [problem("CFG007", str(path), "holds a YAML list or scalar, not a mapping of keys to values")]
    return values, []


def _converted(value, default):
    """The value as the field's type; raises TypeError or ValueError when it is not one."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(default, tuple):
        if not default and isinstance(value, str) and "=" in value:  # one --select entry: KEY=A,B
            return (value.strip(),)
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(type(default[0])(v) if default else str(v).strip() for v in items)
    if isinstance(default, int) and (isinstance(value, bool) or float(value) != int(float(value))):
        raise TypeError("expected a whole number")
    if isinstance(default, (int, float)) and isinstance(value, str):
        raise TypeError(f"expected a number, got the text '{value}'")
    return type(default)(value)


def typed_values(values: dict, defaults: dict, source: str) -> tuple[dict, list[str]]:
    """Values converted to the types of the defaults; unknown keys and wrong types reported."""
    typed, problems = {}, []
    for key, value in values.items():
        if key not in defaults:
            problems.append(problem("CFG001", f"{source}: {key}", f"unknown key{closest(key, defaults)}"))
            continue
        try:
            typed[key] = value if key == "jobs" and value == "auto" else _converted(value, defaults[key])
        except (TypeError, ValueError) as exc:
            kind = type(defaults[key]).__name__
            problems.append(problem("CFG002", f"{source}: {key}", f"{value!r} is not a {kind} ({exc})"))
    return typed, problems


def plain(value):
    """YAML-friendly: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value


def write_yaml(path: str | Path, values: dict, header: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({k: plain(v) for k, v in values.items()}, sort_keys=False)
    path.write_text(f"# {header}\n{text}", encoding="utf-8")
    return path


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block
        sys.stderr.write(f"error: {message} (see python main.py --help)\n")
        raise SystemExit(2)


def _comma_list(kind):
    return lambda text: tuple(kind(t.strip()) for t in text.split(",") if t.strip())


def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass: one source for the code and for --help."""
    source = inspect.getsource(cls)
    # A long comment goes on below its field, indented deeper than the fields: "        # more".
    pattern = r"^    (\w+): [^=\n]+=[^#\n]*#(.+)$((?:\n {8,}#.*$)*)"
    return {m.group(1): " ".join([m.group(2).strip(), *(line.strip()[1:].strip() for line in m.group(3).splitlines() if line.strip())])
            for m in re.finditer(pattern, source, re.M)}


def add_option(group, f: dataclasses.Field, text: str, choices=None) -> None:
    """One dataclass field as a flag: --X/--no-X for booleans, comma lists for tuples."""
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {f.default})".strip())
    elif f.name == "select":  # entries hold commas themselves: KEY=A,B KEY=C,D
        group.add_argument(flag, nargs="+", metavar="KEY=A,B", default=None, type=str, help=text)
    elif f.name == "jobs":  # a number, or auto
        group.add_argument(flag, type=lambda text: text if text == "auto" else int(text), default=None,
                           metavar="N|auto", help=f"{text} (default: {f.default!r})".strip())
    elif isinstance(f.default, tuple):
        kind = type(f.default[0]) if f.default else str
        listed = ",".join(map(str, f.default))
        group.add_argument(flag, type=_comma_list(kind), default=None,
                           help=text if not listed else f"{text}: a comma list (default: {listed})")
    else:
        group.add_argument(flag, type=type(f.default), default=None, choices=choices,
                           help=f"{text} (default: {f.default!r})".strip())


def upgraded(values: dict, defaults: dict) -> dict:
    """The values of a config.yaml an earlier version wrote, in today's keys: its cross_mag_fusion
    flag names a fusion; a file a run wrote (it holds every key of its version) without
    stain_norm is from before the option, when nothing was normalised (a user's short file
    keeps the default)."""
    values = dict(values)
    if "cross_mag_fusion" in values and "fusion" not in values:
        values["fusion"] = "weighted" if values.pop("cross_mag_fusion") else "mean"
    if len(values) > len(defaults) // 2 and "stain_norm" not in values:
        values["stain_norm"] = "none"
    return values


# Options that need a package or do not combine: one line each, every one reported at start.
def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def combination_problems(cfg) -> list[str]:
    """Problems of a Config's options taken together (codes CFG003, CFG009 and CFG010)."""
    rules = [
        (cfg.jobs != "auto" and not (isinstance(cfg.jobs, int) and cfg.jobs >= 0),
         problem("CFG003", "jobs", f"must be a number >= 0 or auto, got {cfg.jobs!r}")),
        (cfg.tensorboard and _missing("tensorboard"),
         problem("CFG009", "tensorboard", "the tensorboard package is not installed: pip install tensorboard "
                 "(or leave --tensorboard off)")),
        (cfg.tracking == "mlflow" and _missing("mlflow"),
         problem("CFG009", "tracking", "MLflow is not installed: pip install -r requirements-tracking.txt (or leave --tracking none)")),
        (cfg.executor == "ray" and _missing("ray"),
         problem("CFG009", "executor", "Ray is not installed: pip install -r requirements-ray.txt (or use --executor local)")),
        (cfg.executor == "ray" and cfg.freeze_backbone and not cfg.cache_dir,
         problem("CFG010", "executor", "ray with --freeze-backbone needs --cache-dir on storage every node sees "
                 "(the feature cache is on each machine's local disk otherwise)")),
        (bool(cfg.feature_grid) and not cfg.freeze_backbone,
         problem("CFG010", "feature_grid", "pools the cached maps of a frozen encoder: add --freeze-backbone or "
                 "leave --feature-grid 0")),
        (cfg.stain_method() != "none" and _missing("torchstain"),
         problem("CFG009", "stain_norm", "the torchstain package is not installed: pip install -r requirements.txt "
                 "(or leave --stain-norm none)")),
        # the feature cache is encoded once for every fold, from raw images
        (cfg.stain_norm in ("macenko", "reinhard") and cfg.freeze_backbone,
         problem("CFG010", "stain_norm", f"'{cfg.stain_norm}' is fitted per fold and cannot be applied to the shared "
                 "feature cache of --freeze-backbone: fine-tune, or use --stain-norm none")),
    ]
    return [text for broken, text in rules if broken]


# ---------------------------------------------------------------- what each option may hold
# The choices of the named options, the least value of the numeric ones, and the --help group
# every Config field sits in (config.py checks all three).
CHOICES = {"folds_source": ("grouped", "kaggle"), "model_selection": ("last", "inner_val"), "tta": ("on", "off"),
            "sample_mode": ("tuple", "pooled", "bag"), "fusion": FUSIONS,
            "pretrained": ("auto", "on", "off"), "amp": ("auto", "bfloat16", "float16", "none"), "loss": ("focal", "ce"),
            "keep_models": ("all", "mmnet"),
            "stain_norm": ("auto", "none", "macenko", "reinhard"), "executor": ("local", "ray"), "tracking": ("none", "mlflow"),
            "device": ("auto", "cuda", "mps", "cpu"), "cuda_graphs": ("on", "off"),
            "grouped_branches": ("on", "off")}
MINIMUM = {"folds": 2, "bag_size": 2, "cv_repeats": 1, "epochs": 1, "patience": 1, "image_size": 32, "feature_dim": 8,
            "batch_size": 1, "micro_batch": 0, "checkpoint_minutes": 0.0, "tuples_per_epoch": 0, "workers": 0, "max_patients": 0,
            "gradcam_patients": 0, "bootstrap_samples": 10, "select_folds": 2, "lr": 1e-9, "subtype_loss_weight": 0.0, "grad_clip": 0.0,
            "warmup_epochs": 0.0, "ema_epochs": 0.0, "weight_decay": 0.0, "focal_gamma": 0.0,
            "colour_jitter": 0.0, "stain_jitter": 0.0, "magnification_dropout": 0.0, "feature_grid": 0, "job_retries": 0}


# --help in the order a user decides: where the data are, what the study runs, which model,
# how it trains, on what device, and what is written. Every Config field sits in one group.
OPTION_GROUPS = {
    "data": ("data_dir", "cache_dir", "magnifications", "image_size", "stain_norm", "max_patients", "folds_source"),
    "study": ("experiments", "dry_run", "analyze_only", "report_only", "resume", "folds", "cv_repeats",
              "inner_val_fraction", "model_selection", "tta", "seed", "select", "select_folds"),
    "model": ("model", "backbone", "backbones", "pretrained", "pretrained_file", "freeze_backbone", "feature_grid", "shared_backbone",
              "feature_dim", "dropout", "spatial_attention", "channel_attention", "hierarchical_attention",
              "fusion", "multiscale_pooling", "subtype_head", "sample_mode", "bag_size"),
    "training": ("epochs", "patience", "batch_size", "tuples_per_epoch", "class_balanced", "lr",
                 "backbone_lr_scale", "weight_decay", "warmup_epochs", "ema_epochs", "grad_clip", "loss",
                 "focal_alpha", "focal_gamma", "subtype_loss_weight", "colour_jitter", "stain_jitter",
                 "quarter_turns", "magnification_dropout"),
    "device": ("device", "amp", "micro_batch", "deterministic", "cuda_graphs", "grouped_branches", "workers", "jobs",
               "executor", "job_retries",
               "checkpoint_minutes"),
    "output and report": ("output_dir", "report_file", "keep_models", "gradcam_patients", "bootstrap_samples",
                          "conformal_alpha", "live_report", "tensorboard", "tracking"),
}


# ---------------------------------------------------------------- the --select grid
FROZEN_ENCODER = ("backbone", "pretrained", "pretrained_file")  # one feature cache serves every combination


def grid_problems(entries, defaults: dict, frozen: bool = False) -> list[str]:
    """One line per unusable --select entry (code CFG013)."""
    problems, seen = [], set()
    for key, values in parse_grid(entries):
        where = f"select {key}"
        if frozen and key in FROZEN_ENCODER:
            problems.append(problem("CFG013", where, "--freeze-backbone encodes every image once with one encoder: "
                                    "select the encoder by --backbones (the same folds) instead"))
        elif key not in defaults or key in NOT_SELECTABLE or isinstance(defaults[key], tuple):
            problems.append(problem("CFG013", where, "not a recipe option that can be selected: name a model or training "
                                    "option of python main.py --help, e.g. stain_norm=none,macenko"
                                    f"{closest(key, [k for k in defaults if k not in NOT_SELECTABLE])}"))
        elif len(set(values)) < 2:
            problems.append(problem("CFG013", where, "needs two or more values: KEY=A,B"))
        elif key in seen:
            problems.append(problem("CFG013", where, "given twice: list every value in one entry"))
        else:
            for value in values:
                try:
                    typed_value(value, defaults[key])
                except ValueError as exc:
                    problems.append(problem("CFG013", where, f"'{value}' is not a {type(defaults[key]).__name__} ({exc})"))
            bad = [v for v in values if key in CHOICES and v not in CHOICES[key]]
            if bad:
                problems.append(problem("CFG013", where, f"'{bad[0]}' is not one of {', '.join(CHOICES[key])}"))
        seen.add(key)
    count = math.prod(max(1, len(values)) for _, values in parse_grid(entries))
    if count > MAX_COMBINATIONS:
        problems.append(problem("CFG013", "select", f"{count} combinations; at most {MAX_COMBINATIONS} (each costs "
                                "select_folds + 1 trainings per outer fold): select fewer values"))
    return problems
