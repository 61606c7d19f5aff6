"""Nested selection (--select KEY=A,B ...) as data: the grid of candidate configurations of the
reference experiment, their names, and the numbering of the inner jobs. Torch-free, like
utils/experiments.py, so that config, folds, engine and report all read the same facts.

Job numbers: 0 .. outer-1 are the outer folds (repeat * folds + fold); the inner folds of outer
job j follow them, outer + j * select_folds + i, so that every job is still one integer fold
whose roles are the column role_f<n> of folds.csv.
"""
from __future__ import annotations

import dataclasses
import itertools

from utils.config_file import CHOICES, closest, problem

SELECT_BASE = "mmnet"  # the experiment whose recipe is selected; its own folds are the fixed defaults
SELECTED = f"{SELECT_BASE}_selected"  # the selected pipeline's outer results
SELECTION_KEY = "selection"  # results.json of runs/mmnet_selected/fold<k>: the choice and every inner score
MAX_COMBINATIONS = 36  # a plain grid; beyond a few dozen a search library would earn its place
# Options that are not a recipe: where things are, what runs, the protocol the selection sits in.
NOT_SELECTABLE = {"data_dir", "output_dir", "cache_dir", "report_file", "dry_run", "analyze_only", "report_only",
                  "experiments", "resume", "folds", "cv_repeats", "folds_source", "seed", "magnifications", "model",
                  "sample_mode", "backbones", "device", "workers", "jobs", "executor", "job_retries", "select",
                  "select_folds", "max_patients", "live_report", "tensorboard", "tracking", "keep_models",
                  "gradcam_patients", "bootstrap_samples", "conformal_alpha", "checkpoint_minutes", "micro_batch",
                  "deterministic", "inner_val_fraction",
                  # read once for the whole study (the image cache, a frozen encoder's feature cache)
                  "image_size", "freeze_backbone", "feature_grid"}


def parse_grid(entries) -> list[tuple[str, tuple[str, ...]]]:
    """'key=a,b' entries -> [(key, ('a', 'b'))]; the text is typed later, against the field."""
    grid = []
    for entry in entries:
        key, _, values = str(entry).partition("=")
        grid.append((key.strip().replace("-", "_"), tuple(v.strip() for v in values.split(",") if v.strip())))
    return grid


def _typed(text: str, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "on", "off"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "on")
    return type(default)(text)


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
                    _typed(value, defaults[key])
                except ValueError as exc:
                    problems.append(problem("CFG013", where, f"'{value}' is not a {type(defaults[key]).__name__} ({exc})"))
            bad = [v for v in values if key in CHOICES and v not in CHOICES[key]]
            if bad:
                problems.append(problem("CFG013", where, f"'{bad[0]}' is not one of {', '.join(CHOICES[key])}"))
        seen.add(key)
    count = 1
    for _, values in parse_grid(entries):
        count *= max(1, len(values))
    if count > MAX_COMBINATIONS:
        problems.append(problem("CFG013", "select", f"{count} combinations; at most {MAX_COMBINATIONS} (each costs "
                                "select_folds + 1 trainings per outer fold): select fewer values"))
    return problems


def candidates(cfg) -> dict[str, dict]:
    """Candidate name -> its overrides of the reference experiment, in grid order (the first
    value of every key first; a tie in the inner scores goes to the earlier candidate)."""
    if not cfg.select:
        return {}
    defaults = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    grid = parse_grid(cfg.select)
    out = {}
    for combo in itertools.product(*(values for _, values in grid)):
        overrides = {key: _typed(value, defaults[key]) for (key, _), value in zip(grid, combo)}
        name = SELECT_BASE + "".join(f"--{key}-{value}" for key, value in overrides.items())  # typed: 1e-3 is 0.001
        out[name] = overrides
    return out


def combination_text(overrides: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in overrides.items())


def outer_jobs(cfg) -> int:
    return cfg.folds * cfg.cv_repeats


def inner_job_number(outer_count: int, select_folds: int, outer: int, inner: int) -> int:
    """The job number of inner fold `inner` of outer job `outer` (the one numbering)."""
    return outer_count + outer * select_folds + inner


def inner_place(outer_count: int, select_folds: int, job: int) -> tuple[int, int]:
    """(outer job, inner fold) of selection job `job`: inner_job_number read backwards."""
    return divmod(job - outer_count, select_folds)


def inner_jobs(cfg, outer: int) -> list[int]:
    """The job numbers of outer job `outer`'s inner folds."""
    return [inner_job_number(outer_jobs(cfg), cfg.select_folds, outer, i) for i in range(cfg.select_folds)]


def all_inner_jobs(cfg) -> list[int]:
    return [n for j in range(outer_jobs(cfg)) for n in inner_jobs(cfg, j)] if cfg.select else []


def is_selection_job(cfg, fold: int) -> bool:
    return fold >= outer_jobs(cfg)


def job_place(cfg, fold: int) -> dict:
    """Where job `fold` sits: its repeat and outer fold, and for an inner job the outer job it
    selects for and its inner fold."""
    if not is_selection_job(cfg, fold):
        return {"repeat": fold // cfg.folds, "outer_fold": fold % cfg.folds}
    outer, inner = inner_place(outer_jobs(cfg), cfg.select_folds, fold)
    return {"repeat": outer // cfg.folds, "outer_fold": outer % cfg.folds, "inner_of": outer, "inner_fold": inner}
