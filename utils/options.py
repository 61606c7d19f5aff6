"""What each command-line option may hold: the choices of the named ones, the least value of the
numeric ones, and the --help group every Config field sits in (config.py checks all three)."""
from __future__ import annotations

from utils.experiments import FUSIONS

CHOICES = {"folds_source": ("grouped", "kaggle"), "model_selection": ("last", "inner_val"), "tta": ("on", "off"),
            "sample_mode": ("tuple", "pooled", "bag"), "fusion": FUSIONS,
            "pretrained": ("auto", "on", "off"), "amp": ("auto", "bfloat16", "float16", "none"), "loss": ("focal", "ce"),
            "keep_models": ("all", "mmnet"),
            "stain_norm": ("auto", "none", "macenko", "reinhard"), "executor": ("local", "ray"), "tracking": ("none", "mlflow"),
            "device": ("auto", "cuda", "mps", "cpu")}
MINIMUM = {"folds": 2, "bag_size": 2, "cv_repeats": 1, "epochs": 1, "patience": 1, "image_size": 32, "feature_dim": 8,
            "batch_size": 1, "micro_batch": 0, "checkpoint_minutes": 0.0, "tuples_per_epoch": 0, "workers": 0, "jobs": 0, "max_patients": 0,
            "gradcam_patients": 0, "bootstrap_samples": 10, "lr": 1e-9, "subtype_loss_weight": 0.0, "grad_clip": 0.0,
            "warmup_epochs": 0.0, "ema_epochs": 0.0, "weight_decay": 0.0, "focal_gamma": 0.0,
            "colour_jitter": 0.0, "stain_jitter": 0.0, "magnification_dropout": 0.0, "feature_grid": 0, "job_retries": 0}


# --help in the order a user decides: where the data are, what the study runs, which model,
# how it trains, on what device, and what is written. Every Config field sits in one group.
OPTION_GROUPS = {
    "data": ("data_dir", "cache_dir", "magnifications", "image_size", "stain_norm", "max_patients", "folds_source"),
    "study": ("experiments", "dry_run", "analyze_only", "report_only", "resume", "folds", "cv_repeats",
              "inner_val_fraction", "model_selection", "tta", "seed"),
    "model": ("model", "backbone", "backbones", "pretrained", "pretrained_file", "freeze_backbone", "feature_grid", "shared_backbone",
              "feature_dim", "dropout", "spatial_attention", "channel_attention", "hierarchical_attention",
              "fusion", "multiscale_pooling", "subtype_head", "sample_mode", "bag_size"),
    "training": ("epochs", "patience", "batch_size", "tuples_per_epoch", "class_balanced", "lr",
                 "backbone_lr_scale", "weight_decay", "warmup_epochs", "ema_epochs", "grad_clip", "loss",
                 "focal_alpha", "focal_gamma", "subtype_loss_weight", "colour_jitter", "stain_jitter",
                 "quarter_turns", "magnification_dropout"),
    "device": ("device", "amp", "micro_batch", "deterministic", "workers", "jobs", "executor", "job_retries",
               "checkpoint_minutes"),
    "output and report": ("output_dir", "report_file", "keep_models", "gradcam_patients", "bootstrap_samples",
                          "conformal_alpha", "live_report", "tensorboard", "tracking"),
}
