"""The kernel paths a linear layer can take on this machine, and the choice among them, measured at load time.

A decode step reads every weight once and does little else, so its time is the linear layers' reading speed. On
the CPU, torch's `F.linear` and oneDNN with the weight prepacked once into its blocked layout read the same bf16
weights at different speeds (on the development machine's 2 EPYC cores, oneDNN was 1.3-1.6x faster for the Qwen
1.5B's matrices), and which is faster depends on the CPU, the dtype and the shape: so each shape is timed on both,
over the model's own weights, and takes the faster, among the kernels whose result for a row doesn't depend on
how many rows share the call (so that speculation's verdicts are the model's own greedy choices, bit for bit). On a
GPU, cuBLAS through `F.linear` is the path.

Weight-only quantization (AMUSD_DRAFT_QUANT, AMUSD_VERIFY_QUANT) is a path of its own, which dequantizes the
weights on the fly: int8 with a scale per output channel (torch's `_weight_int8pack_mm`), or int4 with a scale and
a zero point per group of 32 inputs (`_weight_int4pack_mm_for_cpu`, CPU only). It serves another model, the
quantized one, so `auto` never takes it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import ConfigurationError

log = logging.getLogger(__name__)
TIMING_ROUNDS = 3  # passes over a shape's weights per kernel; the fastest of them counts
TIMING_BYTES = 256 << 20  # weights timed per shape: more than any CPU cache holds, so they stream from memory
# Rows a smaller input is padded to (1: left alone). A lone row can take other kernels than a batch's rows (oneDNN's
# and F.linear's on the development machine's EPYC reduce it in another order for some shapes), and then a token
# decoded alone would get other logits than the same token verified among others; padded to a batch, it can't.
# Only paddings that pass the check in `_agrees` are taken. On that machine oneDNN's kernels also read bf16 weights
# up to 1.2x faster for 4 rows than for 1 or 2.
ROWS = (1, 2, 4)
BATCHES = (3, 5, 16, 64)  # the batch sizes a kernel's results are compared across
INT4_GROUP = 32  # inputs per scale and zero point of an int4 weight, as llama.cpp's Q4 blocks


@dataclass(frozen=True)
class Path:
    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor]  # the weight as this path reads it
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, prepared, bias) -> y


ATEN = Path("aten", lambda w: w, F.linear)
ONEDNN = Path("onednn", lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 1),
              lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
PATHS = {p.name: p for p in (ATEN, ONEDNN)}


class Int8(NamedTuple):
    """A weight quantized per output channel: int8 values [out, in] and their scales [out]."""
    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int8":
        """Symmetric round-to-nearest: each output channel's largest magnitude becomes 127."""
        w = weight.float()
        scales = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values, scales.to(weight.dtype))


def _int8_apply(x: torch.Tensor, w: Int8, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w.values, w.scales).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Int4(NamedTuple):
    """A weight quantized per group of INT4_GROUP inputs, packed for the CPU kernel: its output channels padded to a
    multiple of 16 (the kernel's tile), `out` of them real."""
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [in / INT4_GROUP, out padded, 2]
    out: int

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int4":
        """Asymmetric round-to-nearest: each group's range spread over the 16 levels."""
        n, k = weight.shape
        if k % INT4_GROUP:
            raise ConfigurationError(f"int4 quantization needs inputs in groups of {INT4_GROUP}: a weight has {k}")
        w = torch.cat([weight.float(), weight.new_zeros(-n % 16, k, dtype=torch.float32)]).view(-1, k // INT4_GROUP,
                                                                                                    INT4_GROUP)
        low, high = w.amin(-1), w.amax(-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        levels = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(levels.view(-1, k), 2)
        zeros = low + 8 * scales  # the kernel computes (level - 8) * scale + zero
        return cls(packed, torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(weight.dtype), n)


def _int4_apply(x: torch.Tensor, w: Int4, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), w.packed, INT4_GROUP, w.scales_and_zeros)
    y = y[:, :w.out].reshape(*x.shape[:-1], w.out)
    return y if bias is None else y + bias


INT8 = Path("int8", Int8.of, _int8_apply)
INT4 = Path("int4", Int4.of, _int4_apply)
QUANTIZED = {p.name: p for p in (INT8, INT4)}  # AMUSD_*_QUANT's values besides none


def nbytes(weight: torch.Tensor | Int8 | Int4) -> int:
    """The bytes a step reads of a weight, as its path holds it."""
    parts = weight[:2] if isinstance(weight, (Int8, Int4)) else (weight,)
    return sum(t.numel() * t.element_size() for t in parts)


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


def candidates(device: torch.device, dtype: torch.dtype, asked: str = "auto", quant: str = "none") -> tuple[Path, ...]:
    """The paths this torch build offers for weights of this dtype on this device, or the one asked for
    (AMUSD_KERNELS), or the quantized one (AMUSD_*_QUANT): ConfigurationError if it can't run here."""
    if quant != "none":
        if asked != "auto":
            raise ConfigurationError(f"AMUSD_KERNELS={asked} computes unquantized weights: with {quant} quantization "
                                     f"leave it auto")
        return (_offered(QUANTIZED[quant], device, dtype, f"{quant} weight-only quantization"),)
    if asked != "auto":
        return (_offered(PATHS[asked], device, dtype, f"AMUSD_KERNELS={asked}"),)
    return tuple(path for path in PATHS.values() if _runs(path, device, dtype))


def _runs(path: Path, device: torch.device, dtype: torch.dtype) -> bool:
    if path in (ONEDNN, INT4) and device.type != "cpu" or path is ONEDNN and not torch.backends.mkldnn.is_available():
        return False
    try:
        path.apply(torch.ones(1, 32, dtype=dtype, device=device),
                   path.prepare(torch.ones(16, 32, dtype=dtype, device=device)), None)
        return True
    except (RuntimeError, NotImplementedError):  # no kernel for the dtype here (oneDNN float16 without AVX512-FP16)
        return False


def _offered(path: Path, device: torch.device, dtype: torch.dtype, what: str) -> Path:
    if not _runs(path, device, dtype):
        raise ConfigurationError(f"{what}: this torch build has no {path.name} kernel for {dtype} on {device}")
    return path


def _agrees(path: Path, weight: torch.Tensor, x: torch.Tensor, rows: int) -> bool:
    """Whether rows computed `rows` at a time come out bit for bit as they do in every larger batch tried, at the
    rows where a kernel would split a batch differently: the first few and each batch's last two (a large head takes
    seconds to compare at every row)."""
    probe = sorted({*range(8), *(n - k for n in BATCHES for k in (1, 2))})
    groups = {i // rows: path.apply(x[i // rows * rows:(i // rows + 1) * rows], weight, None) for i in probe}
    alone = {i: groups[i // rows][i % rows] for i in probe}
    for n in BATCHES:
        if n > rows:
            batch = path.apply(x[:n], weight, None)
            if not all(torch.equal(alone[i], batch[i]) for i in probe if i < n):
                return False
    return True


def choose(weights: list[torch.Tensor], paths: tuple[Path, ...]) -> tuple[Kernel, dict[str, float], bool | None]:
    """The fastest kernel for one row (a decode step's input) times these same-shaped weights in turn, enough of
    them to stream from memory as in a step, among those whose result for a row doesn't depend on the batch's
    size; the milliseconds per weight of each kernel timed (those, or all when no kernel here is batch-invariant);
    and whether the chosen one is batch-invariant (None on a GPU, where nothing is timed or compared)."""
    if weights[0].device.type != "cpu":
        return Kernel(paths[0]), {}, None
    weights = weights[:max(1, -(-TIMING_BYTES // (weights[0].numel() * weights[0].element_size())))]
    x = torch.randn(max(BATCHES), weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    prepared = {path: [path.prepare(w) for w in weights] for path in paths}
    invariant = {Kernel(path, rows): _agrees(path, prepared[path][0], x, rows) for path in paths for rows in ROWS}
    admissible = [k for k, agrees in invariant.items() if agrees] or list(invariant)
    times = {k.name: float("inf") for k in admissible}
    for _ in range(TIMING_ROUNDS):  # the kernels take turns, so that a drift of the machine's speed hits all
        for kernel in admissible:
            start = time.perf_counter()
            for w in prepared[kernel.path]:
                kernel(x[:1], w, None)
            times[kernel.name] = min(times[kernel.name], (time.perf_counter() - start) * 1000 / len(weights))
    fastest = min(admissible, key=lambda k: times[k.name])
    return fastest, times, invariant[fastest]
