"""Analysis of a study's MLflow runs: runs -> DataFrame -> Pareto frontier, paper-style tables, plots.

    runs      load_trials / load_studies: trial runs of any tracking URI as a DataFrame
    pareto    frontier(): score vs one cost, or several objectives; ties, duplicates, exclusions; seeds
              averaged per configuration; `contender`: not significantly dominated
    tables    by_size_method (Table 4 style), factor_effects (Table 3 style), forecast_vs_measured,
              over_seeds (one row per configuration: means over its seeds with their t interval);
              text, Markdown, CSV, and show() for notebooks (formatted as the command line prints)
    plots     frontier_plot (error bars, the significantly dominated hollow, optional dollars axis),
              rank_plot, lr_plot, stage_cost_plot, effects_plot (matplotlib, Agg)
    frontier  the CLI `python -m analysis.frontier` and log_study_frontier() for a study's end
    report    the CLI `python -m analysis.report`: do the papers' directions hold? (docs/REPORT.md)
Notebooks beside them (frontier.ipynb, compare.ipynb) only call these.
"""
