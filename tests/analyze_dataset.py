"""Debug utility (not a test): print a summary of a BreakHis tree and its data issues.

    python tests/analyze_dataset.py [--data-dir data/breakhis]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.analyze import analysis_tables  # noqa: E402
from preprocess.preprocess import DataError, index_dataset  # noqa: E402
from utils.env import decode_workers  # noqa: E402
from utils.files import markdown_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/breakhis")
    args = parser.parse_args(argv)
    try:
        index, issues = index_dataset(args.data_dir, workers=decode_workers()[0])
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(index)} usable images, {index['patient'].nunique()} patients, "
          f"{index['group'].nunique()} slide groups, {len(issues)} issue(s)")
    for name, table in analysis_tables(index).items():
        print(f"\n## {name}\n\n{markdown_table(table)}")
    if len(issues):
        print("## issues by kind\n\n" + markdown_table(issues["kind"].value_counts().rename_axis("kind").reset_index()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
