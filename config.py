"""Run configuration: typed defaults, environment detection, CLI parsing, experiments."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from utils.config_file import (
    CHOICES,
    MINIMUM,
    OPTION_GROUPS,
    OneLineParser,
    add_option,
    closest,
    combination_problems,
    field_comments,
    grid_problems,
    problem,
    read_yaml,
    typed_values,
    upgraded,
    write_yaml,
)
from utils.env import PROJECT_ROOT, get_base_path  # noqa: F401  (PROJECT_ROOT: for users of config)
from utils.experiments import (  # noqa: F401 (users and
    ABLATIONS,
    BAG_SIZED_AGGREGATORS,
    BASELINES,
    DEFAULT_EXPERIMENTS,
    EXPERIMENTS,
    FUSION_EXPERIMENTS,  # the report import them
    FUSIONS,
    GROUPS,
    MIL_AGGREGATORS,
    MIL_EXPERIMENTS,  # from config)
    SELECT_BASE,
    SELECTED,
    candidates,
    expand_experiments,
    experiments_help,
)

MAGNIFICATIONS = (40, 100, 200, 400)
STAIN_FIT_IMAGES = 32  # training images of a fold that its --stain-norm reference is fitted on
DEFAULT_STAIN_NORM = "macenko"  # what --stain-norm auto applies when fine-tuning (measured: README "Training recipe")
SUBTYPES = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")  # benign first, then malignant
SUBTYPE_NAMES = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}


class ConfigError(ValueError):
    """A user-facing configuration problem; main prints it as one line."""


@dataclass
class Config:
    # --- paths
    data_dir: str = "data/breakhis"  # BreakHis root, scanned recursively
    output_dir: str = ""  # tables, plots, runs, folds.csv; empty = output/ under utils.env.get_base_path()
    cache_dir: str = ""  # decoded-image and feature caches; empty = <output_dir>/cache for images, local disk ($TMPDIR/mmnet-features) for
        # encoder maps
    report_file: str = ""  # an extra copy of the Markdown report; it is always <output_dir>/RUNPOD_OUTPUT.md
    # --- what to do
    dry_run: bool = False  # tiny end-to-end run on a data subset or demo data
    analyze_only: bool = False  # index, validate, analyse, folds; then stop
    report_only: bool = False  # rebuild tables/plots/report from output/ only
    experiments: tuple = ()  # experiment and group names (default, fusion, mil, all); empty = default
    resume: bool = True  # skip finished folds, continue unfinished ones
    # --- protocol
    folds: int = 5  # outer cross-validation folds
    cv_repeats: int = 1  # repeat the whole cross-validation with new fold seeds; jobs are numbered repeat * folds + fold
    folds_source: str = "grouped"  # grouped | kaggle (data_dir/Folds.csv, if leak-free)
    inner_val_fraction: float = 0.2  # share of training slide groups held out when --model-selection inner_val
    model_selection: str = "last"  # last: fixed budget on every training patient, final weights | inner_val: best inner-validation epoch,
        # early stopping
    tta: str = "on"  # on: evaluation averages the plain view, both mirror images and the 180-degree turn | off: plain view only
    seed: int = 42  # one seed for folds, tuples, augmentation and init
    select: tuple = ()  # nested selection of MMNet's recipe, e.g. stain_norm=none,macenko loss=focal,ce: every combination scored by an
        # inner grouped cross-validation on each outer fold's training patients, the best one tested on the outer fold
    select_folds: int = 3  # inner folds of --select (each combination trains select_folds + 1 times per outer fold)
    # --- data
    image_size: int = 224  # short side of the resized frame; the 700x460 aspect is kept (224 -> 224x341)
    magnifications: tuple = MAGNIFICATIONS  # magnifications fed to the model
    sample_mode: str = "tuple"  # tuple (one image per magnification) | pooled (single images) | bag (MIL: many images of one patient)
    bag_size: int = 16  # images per training bag of the MIL models, drawn from all magnifications; evaluation uses every image
    class_balanced: bool = True  # draw training patients with equal class mass
    max_patients: int = 0  # >0: use a class-balanced subset of patients (dry run)
    colour_jitter: float = 0.1  # brightness, contrast and saturation move by up to +-this; 0 = off
    stain_jitter: float = 0.1  # haematoxylin/eosin amounts scale and shift by up to +-this; 0 = off
    stain_norm: str = "auto"  # auto (DEFAULT_STAIN_NORM when fine-tuning, none with --freeze-backbone) | none | macenko | reinhard: every
        # image's stain mapped onto a reference fitted on the training images of its fold (saved with the fold model)
    quarter_turns: bool = False  # training also turns frames by 90 degrees (all 8 symmetries of the square)
    magnification_dropout: float = 0.25  # training masks each magnification with this probability (never all), as a missing one is at test
    # --- model
    model: str = "mmnet"  # registry name, see backbones.list_models()
    backbone: str = "resnet18"  # timm model name
    backbones: tuple = ()  # several encoders: the same study for each (under encoders/<name>/, on the same folds) and tables/encoders.csv
    pretrained: str = "auto"  # auto (on for CUDA and MPS) | on | off; resolved at start and part of the run identity
    pretrained_file: str = ""  # local weights for the backbone (offline pods)
    freeze_backbone: bool = False  # encoder frozen: its maps of every image (and flip views) computed once and cached; one instance serves
        # every branch and is not saved in fold models
    feature_grid: int = 0  # --freeze-backbone: average-pool the encoder maps to at most this many cells per side before caching (0 = full
        # maps)
    feature_dim: int = 256  # per-magnification embedding size
    dropout: float = 0.3  # before the heads
    spatial_attention: bool = True  # sigmoid map over each backbone feature map
    channel_attention: bool = True  # gate per channel from pooled descriptors
    hierarchical_attention: bool = True  # 100X attends to 40X, 200X to both, 400X to all
    fusion: str = "weighted"  # how MMNet combines its magnification vectors: weighted | mean | concat | gated | attention | cross_attention
        # | bilinear
    multiscale_pooling: bool = True  # off = global average pooling
    shared_backbone: bool = False  # one backbone for all magnifications
    subtype_head: bool = True  # 8-class auxiliary head
    # --- optimisation
    epochs: int = 8  # the training budget (measured on real images, see the README); inner_val may stop sooner
    patience: int = 4  # epochs without inner-validation improvement (--model-selection inner_val)
    batch_size: int = 32  # tuples per optimizer step, the same on every device
    micro_batch: int = 0  # tuples per forward pass; 0 = from device memory (accumulation keeps the step)
    amp: str = "auto"  # auto (bf16 on compute capability >= 8, fp16 + scaler below, none on CPU/MPS) | bfloat16 | float16 | none
    lr: float = 1e-3  # AdamW peak learning rate (heads); backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 1.0  # backbone lr = lr * this (<1: pretrained layers move less)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay
    ema_epochs: float = 0.0  # >0: keep (and validate) an exponential moving average of the weights over about this many epochs; 0 = the
        # weights themselves
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    loss: str = "focal"  # focal | ce (binary cross-entropy)
    focal_alpha: float = 0.5  # malignant weight; 0.5 = neutral (the sampler balances classes); <0 = none
    focal_gamma: float = 2.0  # focusing; 0 = (weighted) cross-entropy
    subtype_loss_weight: float = 0.1  # weight of the subtype cross-entropy in the loss
    tuples_per_epoch: int = 0  # 0 = each training image about once (images / images per drawn tuple)
    # --- environment
    device: str = "auto"  # auto | cuda | mps | cpu
    deterministic: bool = False  # GPU: deterministic kernels, no autotuning (slower)
    cuda_graphs: str = "off"  # on: each fold's training step (whole batches) and evaluation batches run as CUDA graphs
    grouped_branches: str = "on"  # on: MMNet's CNN encoders side by side as one grouped network (the same math); off: one by one
    workers: int = 0  # decode processes; 0 = from CPU affinity
    jobs: int | str = 0  # fold processes at once; 0 = one per GPU (1 without); auto = per GPU as many as memory and cores allow
    executor: str = "local"  # local: this machine (--jobs processes) | ray: every job a Ray task on RAY_ADDRESS's cluster (or a local Ray),
        # pip install -r requirements-ray.txt
    job_retries: int = 2  # --executor ray: times a job whose worker or node died is retried from its last.pt
    checkpoint_minutes: float = 5.0  # write last.pt at most this often (and at a stop, and at a fold's end); 0 = every epoch
    gradcam_patients: int = 4  # figures per fold (TP, TN, FP, FN when available)
    bootstrap_samples: int = 2000  # patient-cluster bootstrap draws for the CIs
    conformal_alpha: float = 0.1  # error rate of the conformal prediction sets per class (benign, malignant, or both = refer); the report
        # also shows 0.05 and 0.2
    keep_models: str = "all"  # experiments whose fold models stay under output/models/: all | mmnet (MMNet and the MIL models,
        # whose Grad-CAM the report draws)
    live_report: bool = True  # rewrite report.html after a fold, at most once a minute (in a separate process)
    tensorboard: bool = False  # per-epoch scalars under <output_dir>/tensorboard/<experiment>/fold<k> (pip install tensorboard)
    tracking: str = "none"  # none | mlflow: one MLflow run per study (config, per-epoch metrics, tables, plots, report), in
        # <output_dir>/mlflow/mlflow.db unless MLFLOW_TRACKING_URI is set (pip install -r requirements-tracking.txt)

    def stain_method(self) -> str:
        """The stain normalisation this run applies: 'auto' resolved (a frozen encoder's one
        feature cache serves every fold, so it cannot take a per-fold reference)."""
        if self.stain_norm != "auto":
            return self.stain_norm
        return "none" if self.freeze_backbone else DEFAULT_STAIN_NORM

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def training_hash(self) -> str:
        """Hash of every field that changes what a fold learns (not paths or run flags)."""
        # cv_repeats: a fold's own split is checked by its folds hash, so adding repeats keeps the
        # folds of the first ones.
        skip = {"data_dir", "output_dir", "cache_dir", "report_file", "dry_run", "analyze_only", "cv_repeats",
                "report_only", "experiments", "backbones", "resume", "workers", "jobs", "gradcam_patients",
                "bootstrap_samples", "conformal_alpha", "keep_models", "micro_batch", "checkpoint_minutes", "device", "executor",
                "job_retries", "deterministic", "tensorboard", "tracking", "live_report", "select", "select_folds", "grouped_branches"}
        if self.sample_mode != "bag":  # a tuple model's training does not change with the bag size
            skip.add("bag_size")
        if self.stain_method() == "none":  # runs from before the option keep their identity
            skip.add("stain_norm")
        # Options added later: at their default, runs from before them keep their identity.
        skip |= {key for key, default in (("feature_grid", 0), ("cuda_graphs", "off")) if getattr(self, key) == default}
        if self.model != "mmnet":  # only MMNet has a fusion: the other models stay finished when it changes
            skip.add("fusion")
        items = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if "stain_norm" in items:  # what is applied: 'auto' and the method it means train the same
            items["stain_norm"] = self.stain_method()
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


# A smoke test of every stage in ~1.5 min on 2 CPU cores: 6 steps per fold, 48 px, the plain view.
DRY_RUN_OVERRIDES = {"folds": 2, "epochs": 2, "patience": 2, "image_size": 48, "tta": "off",
                     "feature_dim": 64, "batch_size": 8, "tuples_per_epoch": 24,
                     "max_patients": 16, "pretrained": "off", "gradcam_patients": 2,
                     "bootstrap_samples": 200, "backbone": "resnet10t", "keep_models": "mmnet"}


def slot_labels(cfg: Config) -> list[str]:
    """What each input slot of the model holds: '40X'..'400X', or 'pooled' for image-level
    models trained on every magnification at once."""
    return ["pooled"] if cfg.sample_mode == "pooled" else [f"{m}X" for m in cfg.magnifications]


def experiment_config(base: Config, name: str) -> Config:
    """A registered experiment's Config, a --select candidate's, or the selected pipeline's (its reference's)."""
    overrides = EXPERIMENTS.get(name, candidates(base).get(name, EXPERIMENTS[SELECT_BASE] if name == SELECTED else None))
    if overrides is None:
        raise ConfigError(f"unknown experiment '{name}'; valid: {', '.join(EXPERIMENTS)}")
    return dataclasses.replace(base, **overrides)


def get_training_config(argv=None) -> dict:
    """The resolved device settings of a run with these options (device, AMP dtype, batch
    size, decode workers, device name and memory), as main.py would use them."""
    from utils.device import detect_env  # torch is imported only here: config stays torch-free

    cfg = parse_args(argv or [])
    return dataclasses.asdict(detect_env(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="MMNet on BreakHis: analysis, folds, training, report.")
    comments, fields = field_comments(Config), {f.name: f for f in dataclasses.fields(Config)}
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    if sorted(grouped) != sorted(fields):  # a new field must be placed in --help, once
        raise RuntimeError(f"OPTION_GROUPS and Config differ: {sorted(set(grouped) ^ set(fields))}")
    for title, names in OPTION_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            text = experiments_help() if name == "experiments" else comments.get(name, "")
            add_option(group, fields[name], text, CHOICES.get(name))
        if title == "study":
            group.add_argument("--config", help="YAML file of Config keys, e.g. the config.yaml an earlier run "
                                                "wrote into its output folder; flags given here win")
    return parser


def _problems(cfg: Config) -> list[str]:
    """Every range, choice, experiment and magnification problem of a Config, one line each."""
    problems = []
    for name, low in MINIMUM.items():
        if getattr(cfg, name) < low:
            problems.append(problem("CFG003", name, f"must be >= {low}, got {getattr(cfg, name)}"))
    if cfg.magnification_dropout >= 1:
        problems.append(problem("CFG003", "magnification_dropout", f"must be below 1, got {cfg.magnification_dropout}"))
    if not 0 < cfg.conformal_alpha < 0.5:
        problems.append(problem("CFG003", "conformal_alpha", f"must lie in (0, 0.5), got {cfg.conformal_alpha}"))
    if not 0.05 <= cfg.inner_val_fraction <= 0.5:
        problems.append(problem("CFG003", "inner_val_fraction", f"must lie in [0.05, 0.5], got {cfg.inner_val_fraction}"))
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            problems.append(problem("CFG004", name, f"'{getattr(cfg, name)}' is not one of {', '.join(choices)}"
                                    f"{closest(getattr(cfg, name), choices)}"))
    for name in cfg.experiments:
        if name not in EXPERIMENTS and name not in GROUPS:
            problems.append(problem("CFG005", "experiments", f"unknown experiment or group '{name}'"
                                    f"{closest(name, [*GROUPS, *EXPERIMENTS])} (groups: {', '.join(GROUPS)}; "
                                    f"python main.py --help lists their members)"))
    if (cfg.sample_mode == "bag") != cfg.model.startswith("mil_"):
        problems.append(problem("CFG004", "sample_mode", f"'{cfg.sample_mode}' does not fit model '{cfg.model}': "
                                "MIL models (mil_*) read bags (sample_mode bag), the others tuples or pooled images"))
    problems += combination_problems(cfg)
    problems += grid_problems(cfg.select, _DEFAULTS, cfg.freeze_backbone) or [  # a candidate's own problems (a fusion that does not fit...)
        f"{text} (select {name})" for name, overrides in candidates(cfg).items()
        for text in _problems(dataclasses.replace(cfg, select=(), **overrides)) if text not in problems]
    bad = [m for m in cfg.magnifications if m not in MAGNIFICATIONS]
    if bad or not cfg.magnifications:
        problems.append(problem("CFG008", "magnifications", f"must be a subset of {MAGNIFICATIONS}, got {bad or '()'}"))
    return problems


def validate(cfg: Config) -> Config:
    """The Config, or a ConfigError with one line per problem (codes in utils/config_file.py)."""
    problems = _problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    # The hierarchy runs from low to high magnification whatever order the flag lists them in.
    experiments = expand_experiments(cfg.experiments)
    if cfg.select and SELECT_BASE not in experiments:  # its own folds are the fixed defaults the selection is compared with
        experiments = (SELECT_BASE, *experiments)
    return dataclasses.replace(cfg, magnifications=tuple(sorted(set(cfg.magnifications))), experiments=experiments,
                               select=tuple(cfg.select))


CONFIG_FILE = "config.yaml"  # the resolved configuration every run writes into its output folder
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def default_output_dir(dry_run: bool) -> str:
    """output/ under the base path; a dry run writes to output/dry_run/, so it never touches
    the files of a full run."""
    return str(get_base_path() / "output" / ("dry_run" if dry_run else ""))


def read_config_file(path: str | Path, source: str | None = None) -> dict:
    """Config values from a YAML file, typed (an earlier version's config.yaml too: see
    utils.config_file.upgraded); ConfigError with one line per problem."""
    values, problems = read_yaml(path)
    typed, more = typed_values(upgraded(values, _DEFAULTS), _DEFAULTS, source or str(path))
    if problems or more:
        raise ConfigError("\n".join(problems + more))
    return typed


def write_config_file(cfg: Config, path: str | Path) -> Path:
    """The resolved configuration: `python main.py --config FILE` reruns it exactly."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("report_only", "analyze_only")}
    return write_yaml(path, values, "resolved configuration; rerun with: python main.py --config " + str(path))


def _stored_values(given: dict) -> dict:
    """--report-only reads the run's own configuration, so a rebuilt report shows the numbers
    the run computed (bootstrap draws, seed); flags given explicitly still win."""
    out = Path(given.get("output_dir") or default_output_dir(bool(given.get("dry_run"))))
    stored = out / CONFIG_FILE
    return read_config_file(stored) if stored.is_file() else {}


def parse_args(argv=None) -> Config:
    """CLI -> Config. Explicit flags win over a --config file (or, for --report-only, the run's
    stored config.yaml), which wins over dry-run defaults, which win over Config defaults."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    config_file = given.pop("config", None)
    stored = read_config_file(config_file) if config_file else _stored_values(given) if given.get("report_only") else {}
    merged = {**stored, **given}
    base = dict(DRY_RUN_OVERRIDES) if merged.get("dry_run") else {}
    base.update(merged)
    base["output_dir"] = base.get("output_dir") or default_output_dir(bool(base.get("dry_run")))
    return validate(Config(**base))
