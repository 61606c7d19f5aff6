"""The experiments of a study as data: name -> overrides of config.Config, and the groups that
--experiments takes. Baselines and ablations are configuration, not code."""
from __future__ import annotations

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
