"""Benchmarks: the baselines speculation is measured against, recorded traces and latency models, the ideal each
schedule could reach, prompt sets, and `amusd-mq bench`. Serving code never imports this package; a service told to
serve a trace (`trace:FILE`, which only a benchmark deployment names) finds `trace` as the plugin registered for
the scheme (amusd_mq.models)."""
