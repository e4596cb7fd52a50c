"""Command-line tools, installed as console scripts (pyproject.toml) and also runnable as
`python tools/<name>.py`: mmscale-eval, mmscale-build-shards, mmscale-sweep, mmscale-bench-loader,
mmscale-bench.
Training is `mmscale-train` (mmscale/train.py)."""
