"""Nested selection (--select): the grid as configuration, the selection folds, and a run on
synthetic data where one option is clearly better (a learning rate that learns against one
that cannot) and the defaults are the worse one, so neither the first listed nor the defaults
can win by accident."""
import json

import pandas as pd
import pytest

from config import ConfigError, parse_args, read_config_file, write_config_file
from preprocess.splits import FoldError, assert_disjoint, build_folds
from utils.experiments import SELECTED, candidates, inner_jobs, job_place, outer_jobs
from utils.study.selection import best_candidate, study_jobs

GOOD, BAD = "mmnet--lr-0.001", "mmnet--lr-1e-09"


def test_the_grid_is_checked_at_start_one_line_each():
    with pytest.raises(ConfigError) as error:
        parse_args(["--select", "stain_nrm=none,macenko", "lr=1e-3", "stain_norm=none,mcenko", "image_size=64,128"])
    lines = str(error.value).splitlines()
    assert any("[CFG013] select stain_nrm" in line and "stain_norm" in line for line in lines)  # did you mean
    assert any("[CFG013] select lr: needs two or more values" in line for line in lines)
    assert any("'mcenko' is not one of" in line for line in lines)
    assert any("select image_size: not a recipe option" in line for line in lines)  # the study's one image cache
    with pytest.raises(ConfigError, match=r"\[CFG013\] select backbone: --freeze-backbone"):
        parse_args(["--freeze-backbone", "--select", "backbone=resnet18,resnet34"])
    with pytest.raises(ConfigError, match=r"\[CFG010\] stain_norm.*\(select mmnet--stain_norm-macenko\)"):
        parse_args(["--freeze-backbone", "--select", "stain_norm=none,macenko"])  # a candidate's own problem


def test_candidates_resolve_to_configs_and_survive_the_config_file(tmp_path):
    cfg = parse_args(["--select", "stain_norm=none,macenko", "loss=focal,ce", "--experiments", "single_200x"])
    assert cfg.experiments == ("mmnet", "single_200x")  # the defaults the selection is compared with
    assert list(candidates(cfg)) == ["mmnet--stain_norm-none--loss-focal", "mmnet--stain_norm-none--loss-ce",
                                     "mmnet--stain_norm-macenko--loss-focal", "mmnet--stain_norm-macenko--loss-ce"]
    from config import experiment_config

    chosen = experiment_config(cfg, "mmnet--stain_norm-none--loss-ce")
    assert (chosen.stain_norm, chosen.loss, chosen.model) == ("none", "ce", "mmnet")
    assert experiment_config(cfg, SELECTED).training_hash() == experiment_config(cfg, "mmnet").training_hash()
    assert cfg.training_hash() == parse_args([]).training_hash()  # --select changes no fold's training
    write_config_file(cfg, tmp_path / "config.yaml")
    assert read_config_file(tmp_path / "config.yaml")["select"] == cfg.select


def test_inner_jobs_are_numbered_after_the_outer_ones():
    cfg = parse_args(["--select", "lr=1e-3,1e-4", "--folds", "5", "--cv-repeats", "2", "--select-folds", "3"])
    assert outer_jobs(cfg) == 10 and inner_jobs(cfg, 0) == [10, 11, 12] and inner_jobs(cfg, 9) == [37, 38, 39]
    assert job_place(cfg, 38) == {"repeat": 1, "outer_fold": 4, "inner_of": 9, "inner_fold": 1}
    assert job_place(cfg, 7) == {"repeat": 1, "outer_fold": 2}
    jobs = study_jobs(cfg, ["mmnet"])
    # mmnet's 10 outer folds; lr=1e-3 is mmnet's own config (its outer folds are mmnet's); lr=1e-4 trains its 10
    assert len(jobs) == 10 + 10 + 2 * 30 and ("mmnet--lr-0.001", 3) not in jobs and ("mmnet--lr-0.001", 12) in jobs


def test_a_tie_keeps_the_defaults_else_the_first_listed():
    scores = {"a": {"auc": 0.8}, "b": {"auc": 0.9}, "c": {"auc": 0.9}}
    assert best_candidate(scores, "c") == ("c", 1) and best_candidate(scores, "a") == ("b", 1)
    assert best_candidate(scores, None) == ("b", 1) and best_candidate({"a": {"auc": 0.7}}, None) == ("a", 0)


def test_selection_folds_never_hold_an_outer_test_patient(listing):
    from preprocess.preprocess import parse_name

    index = pd.DataFrame([{"path": p, **parse_name(f)} for p, f in zip(listing["path"], listing["filename"])])
    folds = build_folds(index, 5, 42, 0.2, repeats=1, select_folds=3)
    for j in range(5):
        outer = folds[f"role_f{j}"]
        tested = []
        for n in range(5 + 3 * j, 5 + 3 * j + 3):
            inner = folds[f"role_f{n}"]
            assert ((outer == "test") == (inner == "outside")).all()
            tested += list(folds.loc[inner == "test", "patient"])
        assert sorted(tested) == sorted(folds.loc[outer != "test", "patient"])  # the inner tests partition them
    broken = folds.copy()
    broken.loc[broken["role_f0"] == "test", "role_f5"] = "train"  # an outer test patient trained in a selection job
    with pytest.raises(FoldError, match="role_f5"):
        assert_disjoint(broken)


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory, demo_tree):
    import main

    out = tmp_path_factory.mktemp("select") / "output"
    argv = ["--dry-run", "--experiments", "mmnet", "--lr", "1e-9", "--select", "lr=1e-9,1e-3", "--select-folds", "2",
            "--backbone", "test_resnet", "--gradcam-patients", "1", "--bootstrap-samples", "20", "--no-live-report",
            "--data-dir", str(demo_tree), "--output-dir", str(out)]
    assert main.main(argv) == 0
    return out, argv


def test_the_clearly_better_option_is_chosen_in_every_outer_fold(selection_run):
    out, _ = selection_run
    for outer in (0, 1):
        results = json.loads((out / "runs" / SELECTED / f"fold{outer}" / "results.json").read_text())
        scores = {s["candidate"]: s["auc"] for s in results["selection"]["scores"]}
        assert results["selection"]["candidate"] == GOOD and scores[GOOD] > scores[BAD], scores
        selected = pd.read_csv(out / "runs" / SELECTED / f"fold{outer}" / "predictions.csv")
        pd.testing.assert_frame_equal(selected, pd.read_csv(out / "runs" / GOOD / f"fold{outer}" / "predictions.csv"))
    report = (out / "RUNPOD_OUTPUT.md").read_text()
    assert "lr=0.001 in 2 of 2 outer folds" in report and "plots/selection.png" in report
    choices = pd.read_csv(out / "tables" / "selection_choices.csv")
    assert list(choices["chosen"]) == ["lr=0.001", "lr=0.001"]
    progress = json.loads((out / "progress.json").read_text())
    assert progress["jobs"] == 2 + 2 + 2 * 2 * 2  # mmnet and lr=1e-3 outer, both candidates' inner jobs


def test_inner_jobs_never_read_their_outer_fold_test_patients(selection_run):
    out, _ = selection_run
    folds = pd.read_csv(out / "folds.csv")
    cfg = parse_args(selection_run[1])
    for name in (GOOD, BAD):
        for outer in (0, 1):
            outer_test = set(folds.loc[folds[f"role_f{outer}"] == "test", "patient"])
            for n in inner_jobs(cfg, outer):
                predicted = set(pd.read_csv(out / "runs" / name / f"fold{n}" / "predictions.csv")["patient"])
                assert predicted and not predicted & outer_test
                assert json.loads((out / "runs" / name / f"fold{n}" / "results.json").read_text())["inner_of"] == outer
    per_fold = pd.read_csv(out / "tables" / f"{GOOD}_folds.csv")
    assert sorted(per_fold["fold"].dropna().astype(str).str.replace(".0", "")) [:2] == ["0", "1"]
    assert len(per_fold) == 3  # the two outer folds and the mean row: inner jobs are scores, not results


def test_a_rerun_trains_nothing_and_chooses_the_same(selection_run):
    import main

    out, argv = selection_run
    before = (out / "tables" / "selection_choices.csv").read_text()
    assert main.main(argv) == 0
    studies = [line for line in (out / "run.log").read_text().splitlines() if "INFO study:" in line]
    assert "(0 trained, 12 finished earlier)" in studies[-1]
    assert (out / "tables" / "selection_choices.csv").read_text() == before
