"""python -m tlx.report DIR [--study=configs/STUDY.py[:ARGS]]: the study's tables and plots into
DIR, from DIR/results.csv; prints the paths written."""

import argparse
import sys

from tlx.report.write import write_study_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tlx.report", description=__doc__.split(":")[1])
    ap.add_argument("workdir", nargs="?", default=".", help="a sweep directory (its results.csv)")
    ap.add_argument(
        "--study",
        default=None,
        help="the study file whose REPORT says what to draw (default: summaries, learning curves)",
    )
    args = ap.parse_args(argv)
    try:
        written = write_study_report(args.workdir, study=args.study)
    except (ValueError, FileNotFoundError) as e:  # the user's: one line, exit 1
        print(f"tlx.report: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
