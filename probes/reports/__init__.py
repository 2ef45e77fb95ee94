"""Reading many runs: aggregate tables, the self-contained HTML report, plots."""
