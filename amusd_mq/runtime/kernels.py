"""The kernel paths a linear layer can take on this machine, and the choice among them, measured at load time.

A decode step reads every weight once and does little else, so its time is the linear layers' reading speed. On
the CPU, torch's `F.linear` and oneDNN with the weight prepacked once into its blocked layout read the same bf16
weights at different speeds (on the development machine's 2 EPYC cores, oneDNN was 1.3-1.6x faster for the Qwen
1.5B's matrices), and which is faster depends on the CPU, the dtype and the shape: so each shape is timed on both,
over the model's own weights, and takes the faster, among the kernels whose result for a row doesn't depend on
how many rows share the call (so that speculation's verdicts are the model's own greedy choices, bit for bit). On a
GPU, cuBLAS through `F.linear` is the path.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
TIMING_ROUNDS = 3  # passes over a shape's weights per kernel; the fastest of them counts
TIMING_BYTES = 256 << 20  # weights timed per shape: more than any CPU cache holds, so they stream from memory
# Rows a smaller input is padded to. A lone row takes other kernels than a batch's rows (oneDNN's and F.linear's
# on the development machine's EPYC both reduce it in another order), and then a token decoded alone would get
# other logits than the same token verified among others; padded to a batch, it can't. On that machine oneDNN's
# kernels also read bf16 weights up to 1.2x faster for 4 rows than for 1 or 2.
ROWS = (2, 4)
BATCHES = (3, 5, 16, 64)  # the batch sizes a kernel's results are compared across


@dataclass(frozen=True)
class Path:
    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]  # the weight as this path reads it
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, prepared, bias) -> y


ATEN = Path("aten", lambda w: w, F.linear)
ONEDNN = Path("onednn", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1),
              lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
PATHS = {p.name: p for p in (ATEN, ONEDNN)}


@dataclass(frozen=True)
class Kernel:
    """A path, and the rows an input of fewer is padded to before it runs."""
    path: Path
    rows: int = 1

    @property
    def name(self) -> str:
        return self.path.name if self.rows == 1 else f"{self.path.name}/{self.rows}"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, n = x.shape[:-1], x.shape[:-1].numel()
        if n >= self.rows:
            return self.path.apply(x, weight, bias)
        padded = torch.cat([x.reshape(n, -1), x.new_zeros(self.rows - n, x.shape[-1])])
        return self.path.apply(padded, weight, bias)[:n].view(*lead, -1)


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


def _agrees(path: Path, weight: torch.Tensor, x: torch.Tensor, rows: int) -> bool:
    """Whether rows computed `rows` at a time come out bit for bit as they do in every larger batch tried."""
    alone = torch.cat([path.apply(x[i:i + rows], weight, None) for i in range(0, max(BATCHES), rows)])
    return all(torch.equal(alone[:n], path.apply(x[:n], weight, None)) for n in BATCHES if n > rows)


def choose(weights: list[torch.Tensor], paths: tuple[Path, ...]) -> tuple[Kernel, dict[str, float], bool | None]:
    """The fastest kernel for one row (a decode step's input) times these same-shaped weights in turn, enough of
    them to stream from memory as in a step, among those whose result for a row doesn't depend on the batch's
    size; each kernel's milliseconds per weight; and whether the chosen one is batch-invariant (False when no
    kernel here is, and then the fastest of all; None on a GPU, where nothing is timed or compared)."""
    if weights[0].device.type != "cpu":
        return Kernel(paths[0]), {}, None
    weights = weights[:max(1, -(-TIMING_BYTES // (weights[0].numel() * weights[0].element_size())))]
    x = torch.randn(max(BATCHES), weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    times, invariant = {}, {}
    for path in paths:
        prepared = [path.prepare(w) for w in weights]
        padded = [Kernel(path, rows) for rows in ROWS]
        for kernel in padded:
            invariant[kernel] = _agrees(path, prepared[0], x, kernel.rows)  # its first calls also pick its kernel
            times[kernel.name] = float("inf")
        for _ in range(TIMING_ROUNDS):  # the paddings take turns, so that a drift of the machine's speed hits all
            for kernel in padded:
                start = time.perf_counter()
                for w in prepared:
                    kernel(x[:1], w, None)
                times[kernel.name] = min(times[kernel.name], (time.perf_counter() - start) * 1000 / len(weights))
        del prepared
    admissible = [k for k in invariant if invariant[k]] or list(invariant)
    fastest = min(admissible, key=lambda k: times[k.name])
    return fastest, times, invariant[fastest]
