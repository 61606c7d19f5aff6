"""The experiments of a study as data: name -> overrides of config.Config, and the groups that
--experiments takes. Baselines and ablations are configuration, not code."""
from __future__ import annotations

import dataclasses
import itertools

# Registered component names (backbones/fusion.py and backbones/mil.py register exactly these;
# a test checks it). Here, not there, so that config and --help stay free of torch.
FUSIONS = ("weighted", "mean", "concat", "gated", "attention", "cross_attention", "bilinear")
MIL_AGGREGATORS = ("mean", "max", "attention", "gated_attention")
# Aggregators whose output moves with the number of images (a max over more images is larger):
# their models are scored on bags of --bag-size, as they were trained, averaged per patient.
BAG_SIZED_AGGREGATORS = ("max",)


# name -> overrides of Config. Baselines and ablations are configuration, not code.
EXPERIMENTS: dict[str, dict] = {
    "mmnet": {},
    "single_40x": {"model": "single", "magnifications": (40,)},
    "single_100x": {"model": "single", "magnifications": (100,)},
    "single_200x": {"model": "single", "magnifications": (200,)},
    "single_400x": {"model": "single", "magnifications": (400,)},
    "simple_concat": {"model": "simple_concat"},
    "pooled_single": {"model": "single", "sample_mode": "pooled"},
    "mmnet_no_spatial": {"spatial_attention": False},
    "mmnet_no_channel": {"channel_attention": False},
    "mmnet_no_hierarchical": {"hierarchical_attention": False},
    "mmnet_no_fusion": {"fusion": "mean"},
    "mmnet_no_msap": {"multiscale_pooling": False},
    "mmnet_ce_loss": {"focal_gamma": 0.0},  # the same loss without focusing: the only change
}
BASELINES = ("single_40x", "single_100x", "single_200x", "single_400x", "simple_concat",
             "pooled_single")
ABLATIONS = tuple(n for n in EXPERIMENTS if n.startswith("mmnet_"))
DEFAULT_EXPERIMENTS = tuple(EXPERIMENTS)  # what `python main.py` runs
# MMNet with each other fusion strategy. A strategy that an ablation already is (mean: the
# ablation mmnet_no_fusion) is that ablation, so the fusion group reuses its folds instead of
# training the same configuration under a second name.
_FUSION_ABLATIONS = {overrides["fusion"]: name for name, overrides in EXPERIMENTS.items()
                     if set(overrides) == {"fusion"}}
FUSION_EXPERIMENTS = tuple(_FUSION_ABLATIONS.get(fusion, f"mmnet_fusion_{fusion}") for fusion in FUSIONS
                           if fusion != "weighted")
EXPERIMENTS.update({f"mmnet_fusion_{fusion}": {"fusion": fusion} for fusion in FUSIONS
                    if fusion != "weighted" and fusion not in _FUSION_ABLATIONS})
MIL_EXPERIMENTS = tuple(f"mil_{name}" for name in MIL_AGGREGATORS)
EXPERIMENTS.update({name: {"model": name, "sample_mode": "bag"} for name in MIL_EXPERIMENTS})
# Groups that --experiments takes besides single names; every group holds its reference, mmnet.
GROUPS = {"default": DEFAULT_EXPERIMENTS, "fusion": ("mmnet", *FUSION_EXPERIMENTS),
          "mil": ("mmnet", *MIL_EXPERIMENTS), "all": tuple(EXPERIMENTS)}


def expand_experiments(names) -> tuple:
    """Group names replaced by their members, in order, each experiment once; empty = default."""
    expanded = [member for name in (names or ("default",)) for member in GROUPS.get(name, (name,))]
    return tuple(dict.fromkeys(expanded))


def experiments_help() -> str:
    groups = "; ".join(f"{name}: {'all of the above' if name == 'all' else ', '.join(members)}"
                       for name, members in GROUPS.items())
    return f"comma list of experiments and groups (default: default). Groups: {groups}"


# ---------------------------------------------------------------- nested selection (--select)
# The grid of candidate configurations of the reference experiment, their names, and the
# numbering of the inner jobs, read alike by config, folds, engine and report. Job numbers:
# 0 .. outer-1 are the outer folds (repeat * folds + fold); the inner folds of outer job j follow
# them, outer + j * select_folds + i, so every job is still one integer fold whose roles are the
# column role_f<n> of folds.csv.

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
                  "deterministic", "cuda_graphs", "grouped_branches", "inner_val_fraction",
                  # read once for the whole study (the image cache, a frozen encoder's feature cache)
                  "image_size", "freeze_backbone", "feature_grid"}


def parse_grid(entries) -> list[tuple[str, tuple[str, ...]]]:
    """'key=a,b' entries -> [(key, ('a', 'b'))]; the text is typed later, against the field."""
    grid = []
    for entry in entries:
        key, _, values = str(entry).partition("=")
        grid.append((key.strip().replace("-", "_"), tuple(v.strip() for v in values.split(",") if v.strip())))
    return grid


def typed_value(text: str, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "on", "off"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "on")
    return type(default)(text)


def candidates(cfg) -> dict[str, dict]:
    """Candidate name -> its overrides of the reference experiment, in grid order (the first
    value of every key first; a tie in the inner scores goes to the earlier candidate)."""
    if not cfg.select:
        return {}
    defaults = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    grid = parse_grid(cfg.select)
    out = {}
    for combo in itertools.product(*(values for _, values in grid)):
        overrides = {key: typed_value(value, defaults[key]) for (key, _), value in zip(grid, combo)}
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
