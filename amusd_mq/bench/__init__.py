"""Benchmarks: the baselines speculation is measured against, recorded traces and latency models, the ideal each
schedule could reach, prompt sets, and `amusd-mq bench`. Serving processes never import this package, except a
worker told to serve a trace (`trace:FILE`), which only a benchmark deployment does."""
