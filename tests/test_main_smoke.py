"""One end-to-end `python main.py --dry-run` on demo data, then what a user does with its
output folder: rerun it from its config.yaml, rebuild the report, open report.html."""
import importlib.util
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import predict
from tests.conftest import ROOT


def _main(*args, timeout=600):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    out, extra = tmp / "output", tmp / "copy" / "RUNPOD_OUTPUT.md"
    tracking = ["--tracking", "mlflow"] if importlib.util.find_spec("mlflow") else []  # CI installs it
    result = _main("--dry-run", "--experiments", "mmnet,single_40x", "--backbone", "test_resnet", *tracking,
                   "--output-dir", str(out), "--report-file", str(extra), "--data-dir", str(tmp / "no_data_here"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, extra, result.stdout


def test_dry_run_writes_every_file(dry_run):
    out, extra, stdout = dry_run
    assert "SYNTHETIC demo data" in stdout
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["mmnet", "single_40x"]
    for fold in (0, 1):
        folder = out / "runs" / "mmnet" / f"fold{fold}"
        for name in ("history.csv", "predictions.csv", "results.json"):
            assert (folder / name).is_file(), folder / name
        assert not (folder / "last.pt").exists() and not (folder / "best.pt").exists()
        assert (out / "models" / "mmnet" / f"fold{fold}.pt").is_file()  # the kept fold model
    assert not (out / "models" / "single_40x").exists()  # --keep-models mmnet in a dry run
    history = pd.read_csv(out / "runs" / "mmnet" / "fold0" / "history.csv")
    assert {"train_binary_loss", "train_subtype_loss"} <= set(history.columns)
    folds = pd.read_csv(out / "folds.csv", dtype={"group": str})
    assert folds["fold"].nunique() == 2 and (folds.groupby("group")["fold"].nunique() == 1).all()
    mmnet = pd.read_csv(out / "tables" / "mmnet_folds.csv")
    assert mmnet["fold"].astype(str).tolist() == ["0", "1", "mean ± sd"]
    for table in ("class_by_magnification", "data_issues", "main_comparison", "main_comparison_values"):
        assert (out / "tables" / f"{table}.csv").is_file()
    for name in ("RUNPOD_OUTPUT.md", "report.html", "config.yaml", "progress.json"):
        assert (out / name).is_file(), name
    assert re.search(r"progress: job \d+ of 4 \| .* ETA \d+m\d\ds", stdout)
    text = (out / "RUNPOD_OUTPUT.md").read_text()
    assert "SYNTHETIC DEMO DATA" in text and "predicted duration" in text and "mmnet fold 1 done" in text
    assert "](plots/roc_mmnet.png)" in text  # figures linked relative to the report
    conformal = pd.read_csv(out / "tables" / "conformal.csv")  # the conformal sets' table and plot
    assert set(conformal["alpha"]) == {0.05, 0.1, 0.2} and (out / "plots" / "conformal_referral.png").is_file()
    stain = sorted((out / "stain").glob("fold*.pt"))  # one stain reference per outer fold, shared
    assert [p.name.split("-")[0] for p in stain] == ["fold0", "fold1"]
    assert "../output/plots/roc_mmnet.png" in extra.read_text()  # the extra copy links back to them


def test_rerun_from_its_config_file_skips_every_fold(dry_run):
    out, _, _ = dry_run
    again = _main("--config", str(out / "config.yaml"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 4
    assert "epoch 1/2" not in again.stdout  # nothing trained


def test_report_only_reproduces_the_published_numbers(dry_run):
    out, _, _ = dry_run
    table = (out / "tables" / "main_comparison.csv").read_bytes()
    log_section = (out / "RUNPOD_OUTPUT.md").read_text().split("## Log")[1]
    rebuilt = _main("--report-only", "--output-dir", str(out))
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert (out / "tables" / "main_comparison.csv").read_bytes() == table
    assert len((out / "RUNPOD_OUTPUT.md").read_text().split("## Log")[1]) == len(log_section)


def test_config_file_typo_is_one_line_naming_the_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("epoch: 3\n")
    result = _main("--config", str(config), "--output-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[CFG001]" in lines[0] and "'epochs'" in lines[0]


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="chromium not installed (.ci/run installs it)")
def test_report_html_renders_every_figure_without_overflow(dry_run, tmp_path):
    out, _, _ = dry_run
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"]
    page = (out / "report.html").as_uri()
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", page], capture_output=True,
                         text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    shown, total = map(int, re.search(r'data-figures="(\d+)/(\d+)"', body).groups())
    assert total >= 8 and shown == total  # every embedded figure decoded
    assert 'data-overflow="false"' in body  # nothing wider than a 1280 px window
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_encoder_table_pairs_encoders_on_the_same_patients(dry_run, tmp_path):
    """--backbones: one row per encoder; the paired difference to the first is 0 for the same
    predictions (on the patients both scored, one being left out of one encoder) and 1 - 2 AUC
    for a model whose probabilities are turned around."""
    from config import Config
    from utils.files import encoder_dir
    from utils.report.encoders import write_encoder_report

    out, _, _ = dry_run
    study = tmp_path / "study"
    for name in ("enc_a", "enc_b", "enc_c"):
        shutil.copytree(out / "runs", encoder_dir(study, name) / "runs")
    for path in (encoder_dir(study, "enc_c") / "runs" / "mmnet").glob("fold*/predictions.csv"):
        frame = pd.read_csv(path)
        frame.assign(prob=1 - frame["prob"]).to_csv(path, index=False)
    left_out = pd.read_csv(encoder_dir(study, "enc_b") / "runs" / "mmnet" / "fold0" / "predictions.csv")
    left_out[left_out["patient"] != left_out["patient"].iloc[0]].to_csv(
        encoder_dir(study, "enc_b") / "runs" / "mmnet" / "fold0" / "predictions.csv", index=False)
    cfg = Config(output_dir=str(study), backbones=("enc_a", "enc_b", "enc_c"), experiments=("mmnet", "single_40x"),
                 bootstrap_samples=200)
    write_encoder_report(cfg)
    table = pd.read_csv(study / "tables" / "encoders.csv")
    assert table["encoder"].tolist() == ["enc_a", "enc_b", "enc_c"] and set(table["experiment"]) == {"mmnet"}
    patients = table.loc[0, "patients"]
    assert table.loc[2, "auc"] == pytest.approx(1 - table.loc[0, "auc"])
    assert table.loc[2, "d_auc"] == pytest.approx(1 - 2 * table.loc[0, "auc"])  # inverted scores: the exact gap
    # enc_b lacks one patient: compared with enc_a on the others, and the table says so
    assert table.loc[1, "d_auc"] == 0 and table.loc[1, "paired_patients"] == patients - 1
    assert table.loc[1, "unpaired_patients"] == 1 and table.loc[2, "unpaired_patients"] == 0
    assert "enc_c" in (study / "RUNPOD_OUTPUT.md").read_text()


def test_predict_gives_each_patient_its_conformal_decision(dry_run, tmp_path):
    """predict.py on a demo patient: a calibrated probability and a conformal set from the run's
    decision_calibration.json; without 40X it is calibrated on the study's patients with 40X
    masked; without two magnifications it says that no calibration fits."""
    import json

    out, _, _ = dry_run
    patient = next(p for p in sorted((out / "demo_data").rglob("SOB_*")) if (p / "40X").is_dir())
    without_40 = tmp_path / "no40" / patient.name
    shutil.copytree(patient, without_40, ignore=lambda folder, names: ["40X"] if folder == str(patient) else [])
    without_two = tmp_path / "no40_100" / patient.name
    shutil.copytree(without_40, without_two, ignore=lambda folder, names: ["100X"] if folder == str(without_40) else [])
    result = subprocess.run([sys.executable, "predict.py", "--run-dir", str(out), "--patient-dir", str(patient),
                             str(without_40), str(without_two)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    complete, lacking_one, lacking_two = json.loads(result.stdout)
    for answer, kind in ((complete, "(all)"), (lacking_one, "(without_40x)")):
        chosen = answer["conformal_set"]
        assert answer["conformal_decision"] == (chosen[0] if len(chosen) == 1 else "refer")
        assert kind in answer["calibrated_on"] and 0 <= answer["calibrated_probability"] <= 1
    assert lacking_two["conformal_set"] is None and "40X, 100X" in lacking_two["conformal_note"]


def test_onnx_export_scores_patients_as_pytorch(dry_run, capsys):
    """predict.py --export onnx writes a fold model as a graph with its description; ONNX Runtime
    gives the PyTorch evaluation's probabilities (a patient without 40X included), in process and
    through predict.py --runtime onnx."""
    import json

    import numpy as np

    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason="pip install -r requirements-export.txt")
    from preprocess.dataset import evaluation_samples
    from preprocess.image_source import ImageSource
    from preprocess.patient_folder import load_patient
    from utils.engine.export import load_onnx_models
    from utils.engine.inference import load_fold_model, magnification_of_rows, patient_data, predict_patient

    out, _, _ = dry_run
    checkpoint = out / "models" / "mmnet" / "fold0.pt"
    assert predict.main(["--checkpoint", str(checkpoint), "--export", "onnx"]) == 0  # the CLI, in this process
    capsys.readouterr()
    meta = json.loads((out / "export" / "mmnet" / "fold0.json").read_text())
    torch_model = load_fold_model(checkpoint)
    assert meta["slots"] == ["40X", "100X", "200X", "400X"] and meta["stain_norm"] == "macenko"
    assert meta["inputs"]["images"]["shape"][1:] == [4, 48, 73, 3] and meta["threshold"] == torch_model.threshold
    reference = torch_model.model.stain.state_dict()
    assert all(np.allclose(meta["stain_reference"][k], v.numpy()) for k, v in reference.items())
    (onnx_model,) = load_onnx_models(out, "mmnet")
    patient = next(p for p in sorted((out / "demo_data").rglob("SOB_*")) if (p / "40X").is_dir())
    cache, by_mag, _ = load_patient(patient, torch_model.cfg.image_size)
    without_40 = {m: rows for m, rows in by_mag.items() if m != 40}
    for images in (by_mag, without_40):
        tuples, _ = evaluation_samples(patient_data(images, torch_model.cfg), torch_model.cfg)
        source = ImageSource(cache, "cpu", mags=magnification_of_rows(images, len(cache)))
        expected = torch_model.predict(source, tuples, "none")
        given = onnx_model.predict(source, tuples, "none")
        for name in ("prob", "subtype_prob", "mag_weights"):
            assert np.abs(given[name] - expected[name].numpy()).max() <= 1e-4, name
    assert (given["mag_weights"][:, 0] == 0).all()  # the missing 40X has no share in the fusion
    folder = out / "no40_onnx" / patient.name
    shutil.copytree(patient, folder, ignore=lambda f, names: ["40X"] if f == str(patient) else [])
    assert predict.main(["--run-dir", str(out), "--runtime", "onnx", "--patient-dir", str(folder)]) == 0
    answer = json.loads(capsys.readouterr().out)
    cache, by_mag, _ = load_patient(folder, torch_model.cfg.image_size)
    assert abs(answer["malignant_probability"] - predict_patient([torch_model], cache, by_mag)["malignant_probability"]) <= 1e-4


def test_mlflow_store_reads_back_the_study(dry_run):
    """--tracking mlflow: one run per study (the rerun and the rebuilt report replaced it), with the
    config as parameters, each fold's epochs as metric history and the report's pooled values."""
    mlflow = pytest.importorskip("mlflow", reason="pip install -r requirements-tracking.txt")
    out, _, _ = dry_run
    mlflow.set_tracking_uri(f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["mmnet-breakhis"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert (row["params.epochs"], row["params.image_size"], row["params.experiments"]) == ("2", "48", "mmnet,single_40x")
    history = pd.read_csv(out / "runs" / "mmnet" / "fold1" / "history.csv")
    logged = mlflow.MlflowClient().get_metric_history(row["run_id"], "mmnet/fold1/train_loss")
    assert sorted((m.step, m.value) for m in logged) == list(zip(history["epoch"] + 1, history["train_loss"]))
    stats = pd.read_csv(out / "tables" / "statistics.csv")
    auc = stats[(stats["experiment"] == "single_40x") & (stats["level"] == "patient") & (stats["metric"] == "auc")]
    assert abs(row["metrics.single_40x/patient/auc"] - auc["pooled"].iloc[0]) < 1e-4  # statistics.csv is rounded
    assert row["artifact_uri"].startswith((out.resolve() / "mlflow" / "artifacts").as_uri())  # not ./mlruns
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(row["run_id"])}
    assert {"RUNPOD_OUTPUT.md", "tables", "plots", "config.yaml"} <= artifacts
