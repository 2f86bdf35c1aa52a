"""What a sweep says, from DIR/results.csv (written by `tlx.sweep`): per-cell statistics over
seeds, paired differences, each condition's winner (`stats`), the tables (`tables`), the plots
(`plots`), and the report a study file declares (`write`: `write_study_report`).

  python -m tlx.report DIR [--study=configs/STUDY.py[:ARGS]]   # tables, report.md, plots/
"""

from tlx.report.stats import (
    FIRST_FIGURE,
    SEED,
    against_rule_of_thumb,
    group_by,
    is_peft,
    oriented_difference,
    paired_differences,
    summarize,
    t_interval,
    tags_of,
    trained_fractions,
    verdict,
    winners,
)
from tlx.report.tables import (
    fraction_table,
    learning_curves,
    markdown,
    pivot,
    read_results,
    write_csv,
)
from tlx.report.write import PLOTS, write_study_report

__all__ = [
    "FIRST_FIGURE",
    "PLOTS",
    "SEED",
    "against_rule_of_thumb",
    "fraction_table",
    "group_by",
    "is_peft",
    "learning_curves",
    "markdown",
    "oriented_difference",
    "paired_differences",
    "pivot",
    "read_results",
    "summarize",
    "t_interval",
    "tags_of",
    "trained_fractions",
    "verdict",
    "winners",
    "write_csv",
    "write_study_report",
]
