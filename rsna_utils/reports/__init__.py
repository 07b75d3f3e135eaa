"""Reports: evaluation with intervals, heatmaps, per-exam figures, plots, the HTML run report
and the EDA tables."""
