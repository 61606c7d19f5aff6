"""--tracking mlflow: the finished study as one MLflow run, written from output/ alone after the
report (any executor, any number of processes: nothing is logged while jobs train).

The run holds the resolved config as parameters, every fold's per-epoch history as metrics
(`<experiment>/fold<k>/<column>` at step = epoch), the pooled statistics of the tables as
metrics (`<experiment>/<level>/<metric>`), and the tables, plots, report and config as
artifacts. A rebuilt report or a resumed study replaces the study's run (found by its
output-folder tag), so there is one run per study. The store is <output_dir>/mlflow/mlflow.db
with artifacts beside it, unless MLFLOW_TRACKING_URI names another (a server, a database).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import pandas as pd

from config import CONFIG_FILE
from utils.files import HTML_REPORT, REPORT_FILE

log = logging.getLogger("mmnet")
EXPERIMENT_NAME = "mmnet-breakhis"
TRACKING_DIR = "mlflow"  # <output_dir>/mlflow/: the default SQLite store and its artifacts
STUDY_TAG = "mmnet.output_dir"  # which study a run records: the resolved output folder
HISTORY_COLUMNS = ("train_loss", "train_binary_loss", "train_subtype_loss", "val_loss", "val_auc", "lr")
BATCH = 900  # MLflow takes at most 1,000 metrics per log_batch call


# Read once, at import: mlflow.set_tracking_uri (anyone's, in this process) writes the variable,
# and a study's own store must never pass for the user's choice.
USER_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(output_dir: str | Path) -> str:
    """The user's MLFLOW_TRACKING_URI when set, else the study's own SQLite store."""
    folder = Path(output_dir).resolve() / TRACKING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return USER_URI or f"sqlite:///{folder / 'mlflow.db'}"


def _experiment_id(client, output_dir: Path) -> str:
    found = client.get_experiment_by_name(EXPERIMENT_NAME)
    if found is not None:
        return found.experiment_id
    # A local store keeps its artifacts beside the database, not in ./mlruns of the shell's folder.
    location = None if USER_URI else (output_dir / TRACKING_DIR / "artifacts").as_uri()
    return client.create_experiment(EXPERIMENT_NAME, artifact_location=location)


def study_params(cfg) -> dict[str, str]:
    """The resolved config, one parameter per field (MLflow keeps values as text)."""
    return {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}


def history_metrics(runs: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) of every fold's per-epoch history."""
    rows = []
    for name, run in runs.items():
        for result, history in zip(run["results"], run["histories"]):
            for column in [c for c in HISTORY_COLUMNS if c in history]:
                for epoch, value in zip(history["epoch"], history[column]):
                    if pd.notna(value):
                        rows.append((f"{name}/fold{result['fold']}/{column}", float(value), int(epoch) + 1))
    return rows


def summary_metrics(stats: pd.DataFrame) -> list[tuple[str, float, int]]:
    """The pooled value of each experiment x level x metric of the report's statistics."""
    part = stats.drop_duplicates(["experiment", "level", "metric"])
    return [(f"{r.experiment}/{r.level}/{r.metric}", float(r.pooled), 0) for r in part.itertuples() if pd.notna(r.pooled)]


def track_study(cfg, runs: dict, stats: pd.DataFrame) -> str:
    """Log the study as one MLflow run (replacing the study's earlier one); returns its run id."""
    import mlflow
    from mlflow.entities import Metric, Param

    out = Path(cfg.output_dir).resolve()
    uri = tracking_uri(out)
    client = mlflow.MlflowClient(tracking_uri=uri)  # no process-wide URI: each study its own store
    experiment = _experiment_id(client, out)
    for earlier in client.search_runs([experiment], filter_string=f"tags.`{STUDY_TAG}` = '{out}'"):
        client.delete_run(earlier.info.run_id)
    run = client.create_run(experiment, run_name=out.name, tags={STUDY_TAG: str(out), "experiments": ",".join(runs)})
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in study_params(cfg).items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v, step in history_metrics(runs) + summary_metrics(stats)]
    client.log_batch(run_id, params=params[:100])
    client.log_batch(run_id, params=params[100:])
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH])
    for folder in ("tables", "plots"):
        if (out / folder).is_dir():
            client.log_artifacts(run_id, str(out / folder), folder)
    log.info("MLflow: run %s of experiment '%s' at %s (%d parameters, %d metrics)", run_id, EXPERIMENT_NAME,
             uri, len(params), len(metrics))
    return run_id


def attach_report(cfg, run_id: str) -> None:
    """The report files as artifacts of the study's run, then the run is closed. Called after
    the Markdown is written and logs nothing: the report's log section is the whole run log."""
    import mlflow

    out = Path(cfg.output_dir).resolve()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(out))
    for name in (REPORT_FILE, HTML_REPORT, CONFIG_FILE):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id)
