"""CLI parsing and validation."""
import pytest

from config import EXPERIMENTS, ConfigError, experiment_config, parse_args


def test_dry_run_defaults_and_explicit_flags_win():
    cfg = parse_args(["--dry-run", "--epochs", "3"])
    assert cfg.folds == 2 and cfg.epochs == 3 and cfg.image_size == 48 and cfg.tta == "off"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], r"\[CFG003\] epochs: must be >= 1"),
    (["--folds", "1"], r"\[CFG003\] folds: must be >= 2"),
    (["--experiments", "mmnet,nope"], r"unknown experiment or group .nope. \(groups: default, fusion, mil, all"),
    (["--magnifications", "40,50"], "subset of"),
])
def test_invalid_values_give_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_unknown_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--loss", "mse"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_experiments_are_overrides_of_one_config():
    base = parse_args([])
    for name, overrides in EXPERIMENTS.items():
        cfg = experiment_config(base, name)
        assert all(getattr(cfg, k) == v for k, v in overrides.items())
    assert experiment_config(base, "mmnet").training_hash() != \
        experiment_config(base, "mmnet_no_spatial").training_hash()


def test_every_option_has_help_text():
    import dataclasses

    from config import Config
    from utils.config_file import field_comments

    comments = field_comments(Config)
    assert {f.name for f in dataclasses.fields(Config)} <= set(comments)
    assert comments["epochs"].startswith("the training budget")


def test_help_shows_the_stages_as_option_groups_in_the_order_a_user_decides():
    import dataclasses

    from config import OPTION_GROUPS, Config, build_parser

    titles = [g.title for g in build_parser()._action_groups if g.title not in ("options", "optional arguments",
                                                                                 "positional arguments")]
    assert titles == ["data", "study", "model", "training", "device", "output and report"]
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Config))  # each field once
    data = next(g for g in build_parser()._action_groups if g.title == "data")
    assert "--data-dir" in [a.option_strings[0] for a in data._group_actions]


def test_slot_labels_name_what_each_input_slot_holds():
    from config import slot_labels

    base = parse_args([])
    assert slot_labels(experiment_config(base, "mmnet")) == ["40X", "100X", "200X", "400X"]
    assert slot_labels(experiment_config(base, "single_200x")) == ["200X"]
    assert slot_labels(experiment_config(base, "pooled_single")) == ["pooled"]


def test_get_training_config_resolves_the_device_settings():
    from config import get_training_config

    settings = get_training_config(["--device", "cpu", "--batch-size", "12"])
    assert settings["device"] == "cpu" and settings["amp_dtype"] == "none"
    assert settings["batch_size"] == 12 and settings["workers"] >= 1


def test_get_base_path_prefers_a_pod_volume(tmp_path, monkeypatch):
    import utils.env as env

    monkeypatch.setattr(env, "RUNPOD_VOLUME", tmp_path / "absent")
    assert env.get_base_path() == env.PROJECT_ROOT
    monkeypatch.setattr(env, "RUNPOD_VOLUME", tmp_path)
    assert env.get_base_path() == tmp_path / "mmnet-breakhis"
