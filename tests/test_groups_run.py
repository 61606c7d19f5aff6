"""`python main.py --experiments fusion,mil`: every fusion strategy and MIL aggregator trains one
step per fold on demo data, and the report compares each group with MMNet."""
import re

import pandas as pd
import pytest

from config import FUSION_EXPERIMENTS, MIL_EXPERIMENTS


@pytest.fixture(scope="module")
def groups_run(tmp_path_factory, demo_tree):
    import main

    out = tmp_path_factory.mktemp("groups") / "output"
    code = main.main(["--dry-run", "--experiments", "fusion,mil", "--backbone", "test_resnet", "--image-size", "32",
                      "--epochs", "1", "--tuples-per-epoch", "8", "--batch-size", "8", "--bag-size", "8",
                      "--gradcam-patients", "1", "--bootstrap-samples", "20", "--no-live-report",
                      "--data-dir", str(demo_tree), "--output-dir", str(out)])
    assert code == 0
    return out


def test_every_group_member_trained_one_step_per_fold(groups_run):
    for name in ("mmnet", *FUSION_EXPERIMENTS, *MIL_EXPERIMENTS):
        for fold in (0, 1):
            history = pd.read_csv(groups_run / "runs" / name / f"fold{fold}" / "history.csv")
            assert len(history) == 1 and history["train_loss"].notna().all(), name
    # 8 tuples of 4 images per epoch = 32 images = 4 bags of 8, one step of (8 x 4 / 8) bags
    assert pd.read_csv(groups_run / "runs" / "mil_attention" / "fold0" / "history.csv")["tuples_per_s"].gt(0).all()


def test_mil_predictions_are_one_bag_per_patient_with_attention(groups_run):
    folder = groups_run / "runs" / "mil_gated_attention" / "fold0"
    predictions = pd.read_csv(folder / "predictions.csv")
    assert predictions["patient"].is_unique
    attention = pd.read_csv(folder / "attention.csv")
    assert set(attention["patient"]) == set(predictions["patient"])
    sums = attention.groupby("patient")["attention"].sum()
    assert ((sums - 1).abs() < 1e-4).all()
    assert attention.groupby("patient")["rank"].min().eq(1).all()
    assert sorted(attention["mag"].unique()) == [40, 100, 200, 400]  # a bag holds every magnification
    assert any(p.name.startswith("mil_gated_attention_fold0") for p in (groups_run / "plots" / "gradcam").iterdir())


def test_a_max_aggregator_is_scored_on_bags_of_its_training_size(groups_run):
    """mil_max: each patient's 12 demo images in ceil(12 / 8) = 2 bags of 8, attention summing to
    1 per patient over its bags; the size-invariant aggregators keep one bag per patient."""
    folder = groups_run / "runs" / "mil_max" / "fold0"
    predictions = pd.read_csv(folder / "predictions.csv")
    assert predictions.groupby("patient").size().eq(2).all()
    sums = pd.read_csv(folder / "attention.csv").groupby("patient")["attention"].sum()
    assert ((sums - 1).abs() < 1e-4).all()
    assert "mil_max: the fixed bags of 8 covering every image" in (groups_run / "RUNPOD_OUTPUT.md").read_text()


def test_weights_are_left_out_where_the_fusion_has_none(groups_run):
    concat = pd.read_csv(groups_run / "runs" / "mmnet_fusion_concat" / "fold0" / "predictions.csv")
    gated = pd.read_csv(groups_run / "runs" / "mmnet_fusion_gated" / "fold0" / "predictions.csv")
    assert not any(c.startswith("w_") for c in concat.columns)
    weights = gated[[c for c in gated.columns if c.startswith("w_")]]
    assert weights.shape[1] == 4 and ((weights.sum(axis=1) - 1).abs() < 1e-4).all()


def test_report_compares_each_group_with_mmnet(groups_run):
    text = (groups_run / "RUNPOD_OUTPUT.md").read_text()
    assert "MIL models (mil_*) read bags instead: training bags of 8 images of one patient" in text  # the protocol
    for title in ("### Fusion strategies", "### MIL aggregators"):
        section = text.split(title, 1)[1].split("###", 1)[0]
        assert re.search(r"^\| mmnet +\|", section, re.M) and "reference" in section
        members = FUSION_EXPERIMENTS if "Fusion" in title else MIL_EXPERIMENTS
        assert section.count("p=") == 2 * len(members)  # balanced accuracy and AUC, paired with mmnet
    per_sample = text.split("### Per-sample level", 1)[1].split("###", 1)[0]
    assert "mil_" not in per_sample  # a MIL bag is a patient: no per-sample level
    stats = pd.read_csv(groups_run / "tables" / "statistics.csv")
    assert set(stats.loc[stats["family"] == "mil", "experiment"]) == set(MIL_EXPERIMENTS)


def test_an_experiment_in_two_families_gets_a_holm_p_in_each(groups_run):
    """mmnet_no_fusion is the ablation and the fusion group's 'mean': one training, and its
    comparison with MMNet is adjusted within each table's own family."""
    stats = pd.read_csv(groups_run / "tables" / "statistics.csv")
    rows = stats[(stats["experiment"] == "mmnet_no_fusion") & stats["family"].notna()]
    assert sorted(rows["family"].unique()) == ["ablation", "fusion"]
    assert rows.groupby("family").size().tolist() == [2, 2]  # balanced accuracy and AUC in each
    # Holm multiplies by the family's size: 2 tests in the ablation table here, 12 in the fusion one
    ablation, fusion = (rows[rows["family"] == f].set_index("metric") for f in ("ablation", "fusion"))
    assert (fusion["p_holm"] >= ablation["p_holm"] - 1e-12).all()
    assert (ablation["p_value"] == fusion["p_value"]).all()
    for name in ("ablation_values", "fusion_comparison_values"):
        values = pd.read_csv(groups_run / "tables" / f"{name}.csv")
        assert values.groupby(["experiment", "metric"]).size().max() == 1, name


def test_an_experiment_in_two_families_is_one_bar_of_the_experiments_plot(groups_run):
    from utils.report.plottings import bar_rows

    stats = pd.read_csv(groups_run / "tables" / "statistics.csv")
    rows = bar_rows(stats, "patient", "auc")
    assert rows["experiment"].is_unique and "mmnet_no_fusion" in set(rows["experiment"])


def test_a_group_section_needs_one_of_its_own_members():
    """A default run (its ablations include mmnet_no_fusion, the fusion group's 'mean') shows
    no fusion section; one own fusion member brings it."""
    from utils.report.build import _group_entries, own_members

    assert "mmnet_no_fusion" not in own_members("fusion") and "mmnet_fusion_gated" in own_members("fusion")
    stats = pd.DataFrame(columns=["experiment", "level", "metric", "family"])
    assert _group_entries(stats, {"mmnet": {}, "mmnet_no_fusion": {}}) == []
    titles = [entry[0] for entry in _group_entries(stats, {"mmnet": {}, "mmnet_fusion_gated": {}})]
    assert len(titles) == 1 and titles[0].startswith("Fusion strategies")
