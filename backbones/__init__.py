"""Model registry: register(name), build_model(cfg), list_models(); timm backbone creation."""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import timm
import torch
from torch import nn

from backbones.encoder import (  # noqa: F401 (models
    GRID_ATTRIBUTE,
    PAD_ATTRIBUTE,
    add_map_hook,
    feature_map,
    freeze,
    frozen_encoder,
    is_token_model,  # use feature_map, map_channels)
    map_channels,
    padded,
    stride,
)
from backbones.registry import Registry
from config import ConfigError
from preprocess.preprocess import frame_shape
from preprocess.stain import stain_normaliser
from utils.config_file import closest

log = logging.getLogger("mmnet")
MODEL_REGISTRY = Registry("model", "model")
register, list_models = MODEL_REGISTRY.register, MODEL_REGISTRY.names


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B,) malignant logit
    subtype_logits: torch.Tensor | None  # (B, 8) or None without a subtype head
    mag_weights: torch.Tensor | None  # (B, M) share of each magnification (0 where missing); None
    # for a fusion whose magnifications mix inside the vector (concat, cross_attention, bilinear)
    attention_maps: torch.Tensor | None = None  # (B, M, h, w) spatial attention, if any
    instance_weights: torch.Tensor | None = None  # (B, K) MIL: how much each image of the bag counted
    hierarchy_weights: torch.Tensor | None = None  # (B, M, M) MMNet in evaluation: each level's attention on the levels below


def build_model(cfg) -> nn.Module:
    return without_batch_counters(MODEL_REGISTRY.create(cfg.model, cfg))


def without_batch_counters(network: nn.Module) -> nn.Module:
    """Each BatchNorm layer with a set momentum loses `num_batches_tracked`: torch reads it only
    when momentum is None, yet adds 1 to it in every training forward, one kernel launch per layer
    and step (84 of an MMNet step: four resnet18 and their spatial attention). The outputs do not change; a state dict
    written with the counters (an earlier checkpoint, a resume) still loads, the counters dropped.
    A frozen encoder is left as it is (it runs in eval mode, and its fingerprint stays)."""
    encoder = frozen_encoder(network)
    frozen = {id(m) for m in encoder.modules()} if encoder is not None else set()
    for layer in network.modules():
        if (isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.momentum is not None
                and getattr(layer, "num_batches_tracked", None) is not None and id(layer) not in frozen):
            layer.register_buffer("num_batches_tracked", None)
            layer._register_load_state_dict_pre_hook(_drop_batch_counter)
    return network


def _drop_batch_counter(state_dict, prefix, *_) -> None:
    state_dict.pop(prefix + "num_batches_tracked", None)


def check_backbone(name: str) -> None:
    """Fail at start, not after the analysis, when timm has no such model. `hf-hub:org/name`
    models are checked when their weights load (offline: one line naming --pretrained-file)."""
    if name.startswith("hf-hub:"):
        return
    if not timm.is_model(name):
        raise ConfigError(f"[CFG006] backbone: unknown timm backbone '{name}'{closest(name, timm.list_models())}; "
                          f"e.g. resnet18, efficientnet_b0, convnext_tiny, vit_small_patch16_224 "
                          f"(python -c \"import timm; print(timm.list_models())\" lists all)")


def _family(name: str) -> str:
    """The timm module that defines a model ('' for hf-hub names, resolved only online)."""
    if name.startswith("hf-hub:"):
        return ""
    return timm.models.model_entrypoint(name).__module__


def _size_kwargs(cfg) -> list[dict]:
    """Image-size arguments to try, most flexible first: vision transformers take any frame
    (padded to the patch size), Swin-like models are built for the frame padded to their stride."""
    family = _family(cfg.backbone)
    built_for = padded(frame_shape(cfg.image_size), 32)
    if "swin" in family:
        return [{"img_size": built_for}, {}]
    if family == "" or any(k in family for k in ("vision_transformer", "deit", "eva", "beit")):
        return [{"dynamic_img_size": True, "dynamic_img_pad": True}, {"img_size": built_for}, {}]
    return [{}]


# Pretrained weights as loaded, by model and weights: a study builds four branches per fold model
# and a fold model per job, and each would read the file (often on a network volume) again.
_PRETRAINED: dict = {}


def _create_timm(cfg, pretrained: bool, kwargs: dict, size: dict) -> nn.Module:
    """timm.create_model; pretrained weights read from their file or the hub once per process,
    later builds take the kept CPU copy (the model's random init runs either way, so the random
    stream after it is the same)."""
    key = (cfg.backbone, cfg.pretrained_file, repr(sorted(size.items())))
    if not pretrained or key not in _PRETRAINED:
        model = timm.create_model(cfg.backbone, pretrained=pretrained, **kwargs, **size)
        if pretrained:
            _PRETRAINED[key] = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return model
    model = timm.create_model(cfg.backbone, pretrained=False, **kwargs, **size)
    model.load_state_dict(_PRETRAINED[key])
    return model


def _timm_model(cfg, pretrained: bool, kwargs: dict) -> nn.Module:
    for size in _size_kwargs(cfg):
        try:
            with torch.random.fork_rng():  # a frozen random encoder is the same in the cache and every model
                if cfg.freeze_backbone:
                    torch.manual_seed(cfg.seed)
                model = _create_timm(cfg, pretrained, kwargs, size)
        except TypeError:  # this architecture does not take that size argument: try the next
            continue
        if "img_size" in size and is_token_model(model):
            setattr(model, PAD_ATTRIBUTE, stride(model))  # inputs padded to the size it was built for
        if cfg.freeze_backbone:  # trains on cached maps: the encoder stays as loaded
            freeze(model)
            setattr(model, GRID_ATTRIBUTE, cfg.feature_grid)
        return add_map_hook(model)
    raise ConfigError(f"[CFG006] backbone: timm could not build '{cfg.backbone}' for {frame_shape(cfg.image_size)} frames")


class WeightsError(ConfigError):
    """Pretrained weights were asked for and cannot be loaded: nothing trains from a silent
    random init."""


def wants_pretrained(cfg) -> bool:
    """'auto' is resolved at start (on for CUDA); here it can only mean a local file was given."""
    return cfg.pretrained == "on" or bool(cfg.pretrained_file)


# Frozen encoders alive in this process, by what makes their weights: every branch, fold model
# and ensemble member of a study uses one instance (a ViT-g is 4.5 GB in fp32), loaded once.
_FROZEN: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Strong references while a process runs job after job (a Ray worker, a whole study): without
# them the encoder dies with each fold model and the next fold loads it again.
_HELD: dict = {}
_HOLD = {"on": False}


def hold_frozen_encoders(on: bool = True) -> None:
    """Keep every frozen encoder this process builds until hold_frozen_encoders(False)."""
    _HOLD["on"] = on
    if not on:
        _HELD.clear()


def encoder_key(cfg) -> tuple:
    """What a frozen encoder's weights and maps depend on (a random init: the seed)."""
    init = cfg.seed if not wants_pretrained(cfg) else "weights"
    return cfg.backbone, cfg.pretrained, cfg.pretrained_file, init, cfg.image_size, cfg.feature_grid


def create_backbone(cfg) -> tuple[nn.Module, str]:
    """timm feature extractor (B, C, h, w) and how it was initialised; with --freeze-backbone
    the one instance of this process for these weights.

    Weights that are wanted and cannot be loaded raise WeightsError with what to do.
    """
    if not cfg.freeze_backbone:
        return _create_backbone(cfg)
    key = encoder_key(cfg)
    encoder = _FROZEN.get(key)
    if encoder is None:
        encoder, status = _create_backbone(cfg)
        encoder.init_status = status
        _FROZEN[key] = encoder
        if _HOLD["on"]:
            _HELD[key] = encoder
    return encoder, encoder.init_status


def _create_backbone(cfg) -> tuple[nn.Module, str]:
    check_backbone(cfg.backbone)
    kwargs = dict(num_classes=0, global_pool="")
    if not wants_pretrained(cfg):
        try:
            return _timm_model(cfg, False, kwargs), "random init"
        except OSError as exc:  # an hf-hub architecture needs its config from the hub
            raise WeightsError(_weights_message(cfg, exc)) from None
    if cfg.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.pretrained_file)
    try:
        model = _timm_model(cfg, True, kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # network, hub or file errors: all mean the weights are not there
        raise WeightsError(_weights_message(cfg, exc)) from None
    return model, f"pretrained ({cfg.pretrained_file or 'timm hub'})"


def _weights_message(cfg, exc: Exception) -> str:
    first = (str(exc).splitlines() or [""])[0][:120]
    if not wants_pretrained(cfg):  # only an hf-hub architecture reaches the network without weights
        return (f"{cfg.backbone} needs its model config from the Hugging Face Hub, which is not reachable and "
                f"not cached ({type(exc).__name__}); run once online to cache it, then pass --pretrained-file "
                f"PATH for the weights offline")
    return (f"pretrained weights for {cfg.backbone} could not be loaded ({type(exc).__name__}: {first}); pass "
            f"--pretrained-file PATH (a timm state dict) or --pretrained off to train from random init")


def check_weights(cfg) -> str:
    """Load the wanted weights once at start (and fill the hub cache), so a run without them
    stops before any analysis or training. Returns how backbones will be initialised."""
    return create_backbone(cfg)[1]


def data_config(backbone: nn.Module) -> tuple[tuple, tuple]:
    """Normalisation mean and std from the backbone's timm data config."""
    config = timm.data.resolve_data_config({}, model=backbone)
    return tuple(config["mean"]), tuple(config["std"])


class Heads(nn.Module):
    """Binary head and optional 8-class subtype head on one embedding."""

    def __init__(self, dim: int, dropout: float, subtype_head: bool, n_subtypes: int = 8):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.binary = nn.Linear(dim, 1)
        self.subtype = nn.Linear(dim, n_subtypes) if subtype_head else None

    def forward(self, z: torch.Tensor):
        z = self.dropout(z)
        return self.binary(z).squeeze(-1), (self.subtype(z) if self.subtype is not None else None)


class StudyModel(nn.Module):
    """What every registered model carries: its magnifications, the normalisation of its
    backbone, where its weights came from, and the binary/subtype heads."""

    def __init__(self, cfg, backbone: nn.Module, pretrained_status: str):
        super().__init__()
        self.magnifications = tuple(cfg.magnifications)
        self.pretrained_status = pretrained_status
        self.norm_mean, self.norm_std = data_config(backbone)
        # The same constants as tensors that move with the model: normalising a batch builds
        # nothing on the host (not saved: they follow from the backbone).
        self.register_buffer("pixel_mean", torch.tensor(self.norm_mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.norm_std), persistent=False)
        # --stain-norm: the fold's fitted reference as buffers, saved with the fold model.
        self.stain = stain_normaliser(cfg.stain_method())
        self.fixed_frame = bool(getattr(backbone, PAD_ATTRIBUTE, 0))  # built for one frame size (Swin-like)
        self.heads = Heads(cfg.feature_dim, cfg.dropout, cfg.subtype_head)


def magnification_backbones(cfg, count: int) -> tuple[nn.ModuleList, str]:
    """One backbone per magnification, or one shared (the same module repeated): always when
    frozen, as identical frozen encoders would only multiply memory."""
    first, status = create_backbone(cfg)
    if cfg.shared_backbone or cfg.freeze_backbone or count == 1:
        return nn.ModuleList([first] * count), status
    return nn.ModuleList([first] + [create_backbone(cfg)[0] for _ in range(count - 1)]), status


# The registered models: importing them runs their @register decorators. They import the
# names above from this package, so they come after them.
from backbones import baseline_simple_concat, baseline_single, mil  # noqa: E402,F401
from backbones.our import model  # noqa: E402,F401
