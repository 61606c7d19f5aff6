"""A model is tested as it learned: BatchNorm statistics settled on what training fed it (the
fold's training tuples with their magnification-dropout masks, patients mixed in every batch,
stain-normalised in float32) before anything is predicted, chosen or kept."""
import dataclasses
import json

import numpy as np
import torch

import utils.engine.batchnorm as batchnorm
import utils.engine.fold as fold_module
from preprocess.augment import model_input
from preprocess.dataset import fold_split
from tests.conftest import tiny_config, tiny_study
from tests.test_host_syncs import resident_study
from utils.device import HostSyncCounter, counting_syncs, derived_seed
from utils.engine.batchnorm import InputMoments, has_batchnorm, settle_batchnorm, settling_samples, trained_batchnorms
from utils.engine.train import new_fold_state


def oracle_statistics(model, source, samples: np.ndarray, batch: int, seed: int) -> list[tuple]:
    """(mean, unbiased variance) of every trained BatchNorm's input over all the batches, in
    float64, from inputs captured by forward hooks in a training-mode pass of its own."""
    layers = trained_batchnorms(model)
    seen = {id(layer): [] for layer in layers}
    hooks = [layer.register_forward_pre_hook(lambda module, inputs: seen[id(module)].append(inputs[0].double()))
             for layer in layers]
    keep = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            images, mask = source.gather(samples[start:start + batch])
            model(model_input(images, model), mask)
    for hook in hooks:
        hook.remove()
    model.load_state_dict(keep)  # the pass moved the running statistics: put them back
    stats = []
    for layer in layers:
        x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen[id(layer)]], dim=1)
        stats.append((x.mean(1), x.var(1, unbiased=True)))
    return stats


def assert_settled_like(model, oracle) -> None:
    for layer, (mean, var) in zip(trained_batchnorms(model), oracle):
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-4, atol=1e-5)


def test_settled_statistics_are_the_mean_and_variance_over_the_dropout_masked_training_tuples(
        tmp_path, demo_tree, demo_index, monkeypatch):
    """Every branch BatchNorm of a tiny MMNet (dropout 0.25) holds the exact mean and variance
    of its input over the shuffled, masked training tuples, in several batches (so the variance
    between batches counts), and settling reads nothing back from the device."""
    cfg = tiny_config(tmp_path, magnification_dropout=0.25, stain_norm="none")
    study = resident_study(cfg, demo_tree, demo_index)
    model = new_fold_state(cfg, study.env, steps_per_epoch=1, seed=0).model
    train = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    samples = settling_samples(train, cfg, seed=5)
    assert (samples < 0).any() and (samples >= 0).any(axis=1).all()  # masked slots, never a whole tuple
    owner = {row: p for p, rows in enumerate(train.rows) for r in rows for row in r}
    first_batch = {owner[row] for row in samples[:4].ravel() if row >= 0}
    assert len(first_batch) > 1  # patients mixed within a batch
    oracle = oracle_statistics(model, study.source, samples, batch=4, seed=5)
    counts = []  # every batch counted, the hooks' merging included (the one upload of the indices aside)
    monkeypatch.setattr(batchnorm, "_settle_batch", counting_syncs(batchnorm._settle_batch, counts.append))
    with HostSyncCounter() as counter:
        assert settle_batchnorm(model.eval(), source=study.source, data=train, cfg=cfg, batch=4, amp_dtype="none",
                                seed=5)
    assert len(counts) == -(-len(samples) // 4) and all(c.counts == {} for c in counts)
    assert counter.counts == {"lift_fresh": 1}, counter.counts  # the upload, once per settling
    assert len(trained_batchnorms(model)) >= 4  # a BatchNorm in every branch at least
    assert_settled_like(model, oracle)
    assert all(layer.momentum == 0.1 for layer in trained_batchnorms(model)) and not model.training  # its mode put back


def test_exact_moments_keep_the_variance_between_patient_sorted_batches():
    """The hand check of the review: 40 patients x 30 samples, between- and within-patient sd 1,
    fed in patient-sorted batches of 32. Averaging per-batch variances (torch's update_bn) loses
    the between-patient part; the merged moments give the variance of all 1,200 samples."""
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(40, 1)) + rng.normal(size=(40, 30))).reshape(-1, 1).astype(np.float32)
    layer = torch.nn.BatchNorm1d(1)
    moments = InputMoments()
    batch_vars = []
    for start in range(0, len(values), 32):
        x = torch.from_numpy(values[start:start + 32])
        moments(layer, (x,))
        batch_vars.append(x.var(unbiased=True).item())
    moments.store(layer)
    assert abs(layer.running_var.item() - values.var(ddof=1)) < 1e-4
    assert abs(layer.running_mean.item() - values.mean()) < 1e-5
    assert np.mean(batch_vars) < 0.85 * values.var(ddof=1)  # what a per-batch average would have kept


def test_settling_normalises_stain_in_float32_under_bf16_autocast(tmp_path, demo_tree, demo_index):
    """The frames the network receives while settling under bf16 autocast equal the float32
    Macenko-normalised frames to within one grey level."""
    from utils.engine.stain_reference import shared_reference

    cfg = tiny_config(tmp_path, stain_norm="macenko")
    study = tiny_study(cfg, demo_tree, demo_index)
    model = new_fold_state(cfg, study.env, steps_per_epoch=1, seed=0, stain=shared_reference(cfg, study, 0)).model
    train = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    samples = settling_samples(train, cfg, seed=1)[:6]
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    settle_batchnorm(model, source=study.source, data=dataclasses.replace(train), cfg=cfg, batch=64,
                     amp_dtype="bfloat16", seed=1)
    images, _ = study.source.gather(samples)
    expected = model_input(images, model)
    grey_level = (seen[0][:6] - expected).abs() * model.pixel_std.view(1, 1, 3, 1, 1) * 255
    assert model.stain.fitted and grey_level.max() <= 1.0


def test_a_model_without_batchnorm_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert not has_batchnorm(model)
    assert settle_batchnorm(model, source=None, data=[], cfg=None, batch=1, amp_dtype="none", seed=0) is False


def test_the_kept_fold_model_holds_the_statistics_of_its_training_tuples(tmp_path, demo_tree, demo_index):
    """After a fold, the kept model's statistics are the oracle's over the fold's settling draw
    (its seed, training's micro-batch), and results.json says it was settled."""
    from utils.engine.inference import load_fold_model

    cfg = tiny_config(tmp_path, epochs=1, stain_norm="none")
    study = tiny_study(cfg, demo_tree, demo_index)
    fold_module.run_fold(cfg, study, "mmnet", 0)
    assert json.loads((tmp_path / "runs" / "mmnet" / "fold0" / "results.json").read_text())["batchnorm_settled"]
    kept = load_fold_model(tmp_path / "models" / "mmnet" / "fold0.pt").model
    train = fold_split(study.index, study.usable, study.folds, 0, cfg)["train"]
    seed = derived_seed(cfg.seed, 0, 4)
    oracle = oracle_statistics(kept, study.source, settling_samples(train, cfg, seed), study.env.micro_batch, seed)
    assert_settled_like(kept, oracle)


def test_inner_validation_compares_candidates_as_they_are_tested(tmp_path, demo_tree, demo_index, monkeypatch):
    """--model-selection inner_val: every validation pass sees a freshly settled model."""
    events = []
    real_settle, real_validate_predict = fold_module.settle_batchnorm, fold_module.predict

    def settle(model, **kwargs):
        events.append("settle")
        return real_settle(model, **kwargs)

    def predict(*args, **kwargs):
        events.append("predict")
        return real_validate_predict(*args, **kwargs)

    monkeypatch.setattr(fold_module, "settle_batchnorm", settle)
    monkeypatch.setattr(fold_module, "predict", predict)
    cfg = tiny_config(tmp_path, epochs=2, model_selection="inner_val", stain_norm="none")
    fold_module.run_fold(cfg, tiny_study(cfg, demo_tree, demo_index), "mmnet", 0)
    assert events.count("predict") == 2 and events[:4] == ["settle", "predict", "settle", "predict"]

