"""The MLflow contract, light enough for analysis: URIs, store queries, a trial's run, the metrics table.

    store      tracking URIs, experiments, tags, finding a study's and a trial's runs
    trial_log  rank 0's handle on its trial's run (TrialLog) and why a trial failed
    metrics    the one table of the metrics a trial logs: name, unit, direction, stage

No Ray and no torch: `analysis/` imports it to read a study. The bottom layer
(tests/test_layers.py): it imports nothing of the project's other packages.
"""
