"""report.html: one self-contained page (figures embedded) a person can open from a browser.

While the run goes on, the page reloads itself every 30 s and shows progress and ETA; the
final page is static. A small script records on the page whether every figure decoded and
whether anything is wider than the window (read back by the browser test).
"""
from __future__ import annotations

import base64
import html
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from utils.env import PROJECT_ROOT
from utils.files import HTML_REPORT, PROGRESS_FILE, atomic_write_text, duration
from utils.report.report_text import header_lines, protocol_text, read_text_file, results_key

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1rem 1.5rem; max-width: 1200px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
h3 { font-size: 1rem; margin-top: 1.5rem; }
.wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.78rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
.progress { background: #eef5ff; padding: 0.6rem 1rem; border-radius: 4px; }
.bar { background: #dde; height: 0.6rem; border-radius: 3px; } .bar div { background: #36c; height: 100%; border-radius: 3px; }
.note { font-size: 0.85rem; color: #555; } pre { white-space: pre-wrap; font-size: 0.75rem; }
"""

SELF_CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures', ok + '/' + images.length);
  var root = document.documentElement;
  document.body.setAttribute('data-overflow', String(root.scrollWidth > root.clientWidth));
});
</script>"""


def _embedded(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def progress_html(info: dict) -> str:
    if not info:
        return ""
    share = info.get("job", 0) / max(1, info.get("jobs", 1))
    where = f"{info['experiment']} fold {info['fold']}, {info.get('detail', '')}" if info.get("experiment") else info.get("detail", "")
    eta = duration(info["eta_s"]) if info.get("eta_s") is not None else "?"
    return (f"<div class='progress'><b>{html.escape(info.get('state', ''))}</b>: job {info.get('job', 0)} of "
            f"{info.get('jobs', 0)} {html.escape(where)} | elapsed {duration(info.get('elapsed_s', 0))} | "
            f"ETA {eta} (about {html.escape(info.get('eta_at', '') or '?')}) | updated {html.escape(info.get('updated', ''))}"
            f"<div class='bar'><div style='width:{100 * share:.0f}%'></div></div></div>")


def table_html(table: pd.DataFrame) -> str:
    return "<div class='wrap'>" + table.to_html(index=False, border=0, escape=True, na_rep="") + "</div>"


def figure_html(path: Path, caption: str) -> str:
    return (f"<figure><img src='{_embedded(path)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_html(path: Path, sections: list[tuple[str, str]], title: str, live: bool) -> Path:
    """sections: (heading, inner HTML). live: reload every 30 s while the run goes on."""
    refresh = "<meta http-equiv='refresh' content='30'>" if live else ""
    body = "".join(f"<h2>{html.escape(h)}</h2>{inner}" if h else inner for h, inner in sections)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{refresh}"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>{SELF_CHECK}</head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return atomic_write_text(path, page)


def write_html_report(cfg, runs: dict, shown: dict, figures: list, live: bool) -> Path:
    out = Path(cfg.output_dir)
    info = json.loads(read_text_file(out / PROGRESS_FILE, "{}"))
    header = [line.removeprefix("- ").replace("**", "").replace("`", "") for line in header_lines(out, runs)
              if line.startswith("- ")]
    sections = [("", progress_html(info) if live else ""),
                ("Run", "<ul>" + "".join(f"<li>{html.escape(h)}</li>" for h in header) + "</ul>"),
                ("Protocol", f"<p>{html.escape(protocol_text(cfg, runs))}</p><p class='note'>{html.escape(results_key(cfg))}</p>")]
    if live:
        sections.append(("", "<p class='note'>Preliminary: folds still training; intervals from at most 200 "
                             "bootstrap draws. The page reloads every 30 s.</p>"))
    for title, table in shown.items():
        if not title.startswith("_") and len(table):
            reading = f"<p class='note'>{html.escape(table.attrs['reading'])}</p>" if "reading" in table.attrs else ""
            sections.append((title, table_html(table) + reading))
    sections.append(("Figures", "".join(figure_html(p, c) for p, c in figures)))
    return write_html(out / HTML_REPORT, sections, "MMNet-BreakHis run report" + (" (running)" if live else ""), live)


class LiveReport:
    """Rewrites report.html after a fold in a separate process (`python -m utils.report`,
    which imports no torch), so training never waits for plots; at most once a minute, so on
    a small CPU the rewrites do not take the cores the training needs. A fold that ends while
    the previous rewrite still runs, or within the minute, is covered by a later one."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, every_s: float = 60.0):
        self.output_dir, self.enabled, self.every_s = Path(output_dir), enabled, every_s
        self.process: subprocess.Popen | None = None
        self.started = -float("inf")  # time.monotonic() of the last rewrite started

    def refresh(self) -> None:
        if not self.enabled:
            return
        if self.process is not None and self.process.poll() is None:
            return  # still writing; the next fold's end starts a fresh one
        if time.monotonic() - self.started < self.every_s:
            return
        self.started = time.monotonic()
        log_file = open(self.output_dir / "live_report.log", "w", encoding="utf-8")
        with log_file:  # the child keeps its own handle
            self.process = subprocess.Popen([sys.executable, "-m", "utils.report", str(self.output_dir)],
                                            cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        """Let a running rewrite end before the final report replaces its files."""
        if self.process is not None:
            self.process.wait()
