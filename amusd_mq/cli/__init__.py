"""The `amusd-mq` command (`main`) and `launch`, which starts services as processes (the demo, benchmarks and tests
use it). The only place that may import every other part."""
from .main import main

__all__ = ["main"]
