"""thinpool performance suite: ratios measured side by side in one run (see perf/engine.py, perf/run.py)."""
