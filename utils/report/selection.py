"""The report of a nested selection (--select): each outer fold's choice with the inner scores of
every combination, how often each won, and the selected pipeline beside the fixed choices on the
same outer folds, paired with MMNet's defaults as every comparison is. Reads files only."""
from __future__ import annotations

import pandas as pd

from utils.experiments import SELECT_BASE, SELECTED, SELECTION_KEY, candidates, combination_text
from utils.files import new_figure, save_figure
from utils.report.tables import comparison_table


def selection_names(cfg) -> list[str]:
    """The experiments a selection adds to the report: the selected pipeline, each candidate."""
    return [SELECTED, *candidates(cfg)] if cfg.select else []


def selection_family(cfg) -> dict:
    """The comparison family of the selection (its own Holm adjustment)."""
    return {"select": tuple(selection_names(cfg))} if cfg.select else {}


def choices_table(run: dict) -> pd.DataFrame:
    """One row per outer fold: what was chosen, and every combination's inner patient AUC."""
    rows = []
    for result in run["results"]:
        choice = result[SELECTION_KEY]
        row = {"repeat": result["repeat"], "fold": result["outer_fold"],
               "chosen": combination_text(choice["overrides"])}
        for score in choice["scores"]:
            row[f"inner AUC: {score['combination']}"] = round(score["auc"], 3)
        row["tied"] = choice["tied"]  # other combinations at the chosen one's inner AUC
        row["inner patients"] = choice["scores"][0]["patients"]
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.drop(columns="repeat") if table["repeat"].nunique() == 1 else table


def wins_table(choices: pd.DataFrame) -> pd.DataFrame:
    """How often each combination was chosen, with a sentence that reads it."""
    counts = choices["chosen"].value_counts()
    table = pd.DataFrame({"chosen": counts.index, "outer folds": counts.to_numpy(),
                          "share": (counts.to_numpy() / len(choices)).round(3)})
    ties = int((choices["tied"] > 0).sum())
    table.attrs["reading"] = ("Chosen by the inner cross-validation: " + "; ".join(
        f"{row.chosen} in {row._2} of {len(choices)} outer folds" for row in table.itertuples()) +
        (". One combination every time" if len(table) == 1 else
         ". The choice moves between outer folds: on these data the inner scores do not tell the combinations apart "
         "reliably") +
        (f"; in {ties} outer fold(s) the best inner AUC was tied, and the defaults (or the first listed) were kept."
         if ties else "."))
    return table


def selection_entries(stats: pd.DataFrame, runs: dict, cfg) -> list[tuple]:
    """(title, file, table, LaTeX too) of the selection's tables; none without a selection."""
    if SELECTED not in runs:
        return []
    choices = choices_table(runs[SELECTED])
    compared = [SELECT_BASE, SELECTED, *candidates(cfg)]
    return [("Nested selection: the selected pipeline and each fixed choice, paired with MMNet's defaults on the same "
             "outer folds (patient level; a choice equal to the defaults is the reference row)", "selection_comparison",
             comparison_table(stats, compared, "patient", "select"), True),
            (f"Nested selection: each outer fold's choice and the inner scores (patient AUC pooled over "
             f"{cfg.select_folds} inner folds of that fold's training patients; its test patients never seen)",
             "selection_choices", choices, False),
            ("Nested selection: how often each combination was chosen", "selection_wins", wins_table(choices), False)]


def selection_plot(runs: dict, path):
    """Inner AUC of every combination per outer fold, the chosen one ringed; None without one."""
    if SELECTED not in runs:
        return None
    fig, ax = new_figure(figsize=(6.5, 3.8))
    results = runs[SELECTED]["results"]
    for first in results[0][SELECTION_KEY]["scores"]:
        ax.plot(range(len(results)), [next(s["auc"] for s in r[SELECTION_KEY]["scores"] if s["candidate"] == first["candidate"])
                                      for r in results], marker="o", label=first["combination"], alpha=0.8)
    chosen = [next(s["auc"] for s in r[SELECTION_KEY]["scores"] if s["candidate"] == r[SELECTION_KEY]["candidate"])
              for r in results]
    ax.scatter(range(len(results)), chosen, s=180, facecolors="none", edgecolors="black", label="chosen")
    ax.set_xticks(range(len(results)), [f"job {r['fold']}" for r in results])
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("outer fold (job)")
    ax.set_ylabel("inner patient AUC (pooled)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
