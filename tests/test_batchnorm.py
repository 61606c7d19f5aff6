"""A model is tested as it learned: BatchNorm statistics settled on the fold's training
patients before anything is predicted or kept."""
import json

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from preprocess.dataset import evaluation_samples, fold_split
from tests.conftest import tiny_config, tiny_study
from utils.engine.batchnorm import has_batchnorm, settle_batchnorm
from utils.engine.train import new_fold_state


def _first_batchnorm(model):
    return next(m for m in model.modules() if isinstance(m, _BatchNorm))


def test_settled_statistics_are_the_exact_mean_and_variance_of_the_training_views(tmp_path, demo_tree, demo_index):
    """Oracle: one batch holding every training sample; the first BatchNorm's input, taken
    independently in eval mode, gives the running mean and (unbiased) variance exactly."""
    cfg = tiny_config(tmp_path)
    study = tiny_study(cfg, demo_tree, demo_index)
    model = new_fold_state(cfg, study.env, steps_per_epoch=1, seed=0).model
    train = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    samples, _ = evaluation_samples(train, cfg)
    bn = _first_batchnorm(model)
    seen = []
    handle = bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    x, mask = next(iter(study.source.views(samples, model, False)))  # the plain view
    with torch.no_grad():
        model.eval()(x, mask)
    seen_input = seen.pop(0)
    initial = bn.running_mean.clone()
    assert settle_batchnorm(model, source=study.source, data=train, cfg=cfg, batch=len(samples), amp_dtype="none")
    handle.remove()
    assert not torch.allclose(initial, bn.running_mean)
    torch.testing.assert_close(bn.running_mean, seen_input.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, seen_input.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # update_bn restores both


def test_a_model_without_batchnorm_is_left_alone(tmp_path, demo_tree, demo_index):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert not has_batchnorm(model)
    assert settle_batchnorm(model, source=None, data=[], cfg=None, batch=1, amp_dtype="none") is False


def test_the_kept_fold_model_holds_the_settled_statistics(tmp_path, demo_tree, demo_index):
    """After a fold, the kept model's statistics are those of its training patients: settling
    it once more changes nothing, and results.json says it was done."""
    from utils.engine.fold import run_fold
    from utils.engine.inference import load_fold_model

    cfg = tiny_config(tmp_path, epochs=1)
    study = tiny_study(cfg, demo_tree, demo_index)
    run_fold(cfg, study, "mmnet", 0)
    assert json.loads((tmp_path / "runs" / "mmnet" / "fold0" / "results.json").read_text())["batchnorm_settled"]
    kept = load_fold_model(tmp_path / "models" / "mmnet" / "fold0.pt").model
    before = {k: v.clone() for k, v in kept.state_dict().items() if "running" in k}
    train = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    settle_batchnorm(kept, source=study.source, data=train, cfg=cfg, batch=2 * study.env.micro_batch,
                     amp_dtype="none")
    after = {k: v for k, v in kept.state_dict().items() if "running" in k}
    assert before and all(torch.allclose(before[k], after[k], rtol=1e-4, atol=1e-6) for k in before)
