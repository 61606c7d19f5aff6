"""Options that need a package or do not combine: one line each, every one reported at start."""
from __future__ import annotations

import importlib.util

from utils.config_file import problem


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def combination_problems(cfg) -> list[str]:
    """Problems of a Config's options taken together (codes CFG009 and CFG010)."""
    rules = [
        (cfg.tensorboard and _missing("tensorboard"),
         problem("CFG009", "tensorboard", "the tensorboard package is not installed: pip install tensorboard "
                 "(or leave --tensorboard off)")),
        (cfg.executor == "ray" and _missing("ray"),
         problem("CFG009", "executor", "Ray is not installed: pip install -r requirements-ray.txt (or use --executor local)")),
        (cfg.executor == "ray" and cfg.freeze_backbone and not cfg.cache_dir,
         problem("CFG010", "executor", "ray with --freeze-backbone needs --cache-dir on storage every node sees "
                 "(the feature cache is on each machine's local disk otherwise)")),
        (bool(cfg.feature_grid) and not cfg.freeze_backbone,
         problem("CFG010", "feature_grid", "pools the cached maps of a frozen encoder: add --freeze-backbone or "
                 "leave --feature-grid 0")),
        (cfg.stain_norm != "none" and _missing("torchstain"),
         problem("CFG009", "stain_norm", "the torchstain package is not installed: pip install -r requirements.txt "
                 "(or leave --stain-norm none)")),
        # the feature cache is encoded once for every fold, from raw images
        (cfg.stain_norm != "none" and cfg.freeze_backbone,
         problem("CFG010", "stain_norm", f"'{cfg.stain_norm}' is fitted per fold and cannot be applied to the shared "
                 "feature cache of --freeze-backbone: fine-tune, or use --stain-norm none")),
    ]
    return [text for broken, text in rules if broken]
