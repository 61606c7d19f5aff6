"""What the data stage hands to training: the index, the folds and the decoded images placed
where the model runs, as one Study object that every fold reads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config
from preprocess.dataset import ImageSource
from preprocess.preprocess import build_cache
from utils.device import EnvInfo


@dataclass
class Study:
    """What a study has prepared, handed as one object to every fold it trains."""
    index: pd.DataFrame  # one row per usable image (INDEX_COLUMNS)
    folds: pd.DataFrame  # one row per patient: group, label, fold, role_f<k>
    data_dir: Path
    demo: bool  # True when the data are synthetic
    magnifications: tuple = ()  # what the study reads (--magnifications): its stain references are fitted on them
    env: EnvInfo | None = None  # set by attach_images()
    source: ImageSource | None = None  # the decoded images where the model runs
    usable: np.ndarray | None = None  # (N,) rows of the index that decoded


def attach_images(cfg: Config, study: Study, env: EnvInfo) -> Study:
    """Decoded-image cache (built once, then only mapped) placed where the model runs."""
    cache, usable = build_cache(study.index, study.data_dir, cfg.resolved_cache_dir(), cfg.image_size, env.workers)
    return dataclasses.replace(study, env=env, source=ImageSource(cache, env.device, mags=study.index["mag"].to_numpy()),
                               usable=usable)
