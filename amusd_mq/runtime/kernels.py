"""The kernel paths a linear layer can take on this machine, and the choice among them, measured at load time.

A decode step reads every weight once and does little else, so its time is the linear layers' reading speed. On
the CPU, torch's `F.linear` and oneDNN with the weight prepacked once into its blocked layout read the same bf16
weights at different speeds (on the development machine's 2 EPYC cores, oneDNN was 1.3-1.6x faster for the Qwen
1.5B's matrices), and which is faster depends on the CPU, the dtype and the shape: so each shape is timed on both,
over the model's own weights, and takes the faster. On a GPU, cuBLAS through `F.linear` is the path.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
TIMING_ROUNDS = 2  # passes over a shape's weights per path; the faster of them counts
TIMING_BYTES = 256 << 20  # weights timed per shape: more than any CPU cache holds, so they stream from memory


@dataclass(frozen=True)
class Path:
    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]  # the weight as this path reads it
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, prepared, bias) -> y


ATEN = Path("aten", lambda w: w, F.linear)
ONEDNN = Path("onednn", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1),
              lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
PATHS = {p.name: p for p in (ATEN, ONEDNN)}


def candidates(device: torch.device, dtype: torch.dtype, asked: str = "auto") -> tuple[Path, ...]:
    """The paths this torch build offers for weights of this dtype on this device, or the one asked for
    (AMUSD_KERNELS): ValueError if it can't run here."""
    offered = [ATEN]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            ONEDNN.apply(torch.ones(1, 16, dtype=dtype), ONEDNN.prepare(torch.ones(8, 16, dtype=dtype)), None)
            offered.append(ONEDNN)
        except RuntimeError:  # no oneDNN kernel for the dtype on this CPU (float16 without AVX512-FP16, say)
            pass
    if asked == "auto":
        return tuple(offered)
    if PATHS[asked] not in offered:
        raise ValueError(f"AMUSD_KERNELS={asked}: this torch build has no {asked} kernel for {dtype} on {device}")
    return (PATHS[asked],)


def choose(weights: list[torch.Tensor], paths: tuple[Path, ...], rows: int = 1) -> tuple[Path, dict[str, float]]:
    """The fastest path for one row (a decode step's input) times these same-shaped weights in turn, enough of
    them to stream from memory as in a step; and each path's milliseconds per weight."""
    if len(paths) == 1:
        return paths[0], {}
    each = weights[0].numel() * weights[0].element_size()
    weights = weights[:max(1, -(-TIMING_BYTES // each))]
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    times = {}
    for path in paths:
        prepared = [path.prepare(w) for w in weights]
        path.apply(x, prepared[0], None)  # the first call of a path chooses its kernel
        best = float("inf")
        for _ in range(TIMING_ROUNDS):
            start = time.perf_counter()
            for w in prepared:
                path.apply(x, w, None)
            best = min(best, time.perf_counter() - start)
        times[path.name] = best * 1000 / len(weights)
        del prepared
    fastest = min(paths, key=lambda p: times[p.name])
    return fastest, times
