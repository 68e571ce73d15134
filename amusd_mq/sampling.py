"""Sampling that speculation cannot change, in three modes a request chooses:

- `greedy`: the argmax.
- `seeded`: the Gumbel-max trick, argmax(logits / T + g) over the tokens top-k and top-p keep, with the noise
  g of position i a pure function of (seed, i). The verify model's token at each position is then fixed by
  the committed prefix and the seed alone, so draft and verifier agree exactly as in greedy decoding, and the
  output equals the verify model's own seeded sample.
- `exact`: speculative rejection sampling. The draft samples from its top DRAFT_TOP tokens, renormalised, and
  sends that sparse distribution q with each token; the verifier accepts x with probability min(1, p(x)/q(x))
  and otherwise samples the normalised residual max(p - q, 0). The output is distributed exactly as the
  verify model's own samples, for any proposal distribution.

Every random number is a 32-bit integer hash of (seed, position, stream, token) computed in int64 tensors,
so every service draws the same ones on any device (CPU and CUDA generators differ), and a position's are
used once: by the pass that commits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .wire.codes import Mode

if TYPE_CHECKING:
    import torch
# torch is imported where it's used: the client validates sampling parameters without loading it.

MODES = tuple(Mode)
DRAFT_TOP = 32  # tokens in the draft's proposal distribution: sparse, so it fits in a message
# Below this, logits / T overflow toward inf and NaN: such a temperature is refused (0 is greedy).
MIN_TEMPERATURE = 1e-4
_M = 0xFFFFFFFF
DRAFT, ACCEPT, RESIDUAL, GUMBEL = 1, 2, 3, 4  # independent random streams


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash; products stay below 2**59, so int64 arithmetic is exact on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M
    return (x >> 16) ^ x


def uniforms(seed: int, positions: list[int], stream: int, n: int | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms in (0, 1), float64: one per position, or [positions, n] with one per token id when n is given."""
    import torch

    key = _mix(torch.tensor([seed & _M], dtype=torch.int64, device=device))
    key = _mix(key ^ (seed >> 32 & _M))
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    key = _mix(_mix(key ^ pos & _M) ^ pos >> 32 & _M)
    key = _mix(key ^ stream)
    if n is not None:
        key = _mix(key[:, None] ^ torch.arange(n, dtype=torch.int64, device=device))
    return (_mix(key).double() + 0.5) / 2.0 ** 32


def _draw(weights: torch.Tensor, u: float | torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample from non-negative weights (any total): its index, as a tensor where the weights are, so
    a caller on a GPU copies nothing to the host before it needs the number."""
    import torch

    cdf = weights.double().cumsum(0)
    return torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)[0].clamp(max=len(weights) - 1)


@dataclass(frozen=True)
class Sampling:
    mode: str = Mode.GREEDY
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        """Why these parameters can't be served; empty when they can."""
        out = []
        if self.mode not in MODES:
            out.append(f"sampling_mode must be one of {MODES}, not {self.mode!r}")
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            out.append(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        elif 0 < self.temperature < MIN_TEMPERATURE:
            out.append(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, not {self.temperature!r}")
        elif self.mode != Mode.GREEDY and self.temperature == 0:
            out.append(f"sampling_mode {self.mode!r} needs a temperature > 0 (temperature 0 is greedy)")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0, not {self.top_k!r}")
        return out

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """logits / T, with -inf for every token top-k and top-p drop; [n, vocab], float64."""
        x = logits.double() / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1:
            probs, order = x.softmax(-1).sort(dim=-1, descending=True, stable=True)
            drop = probs.cumsum(-1) - probs >= self.top_p  # the mass before a token already reaches top_p
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return x

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.filtered(logits).softmax(-1)

    def choose(self, logits: torch.Tensor, positions: list[int]) -> list[int]:
        """The token at each position in greedy or seeded mode, from logits [len(positions), vocab]."""
        if self.mode == Mode.GREEDY:
            return logits.argmax(-1).tolist()
        return self.scores(logits, positions).argmax(-1).tolist()

    def scores(self, logits: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """What seeded mode takes the argmax of: the filtered logits / T plus Gumbel noise keyed by position."""
        import torch

        g = -torch.log(-torch.log(uniforms(self.seed, positions, GUMBEL, logits.shape[-1], logits.device)))
        return self.filtered(logits) + g

    def propose(self, logits: torch.Tensor, position: int) -> tuple[int, list[int] | None, list[float] | None]:
        """The draft's token for one position, and in exact mode the sparse distribution it was drawn from."""
        if self.mode != Mode.EXACT:
            return self.choose(logits, [position])[0], None, None
        top = self.probs(logits[0]).topk(min(DRAFT_TOP, logits.shape[-1]))
        keep = top.values > 0
        q, ids = top.values[keep], top.indices[keep]
        q = q / q.sum()
        token = int(ids[_draw(q, float(uniforms(self.seed, [position], DRAFT)[0]))])
        return token, ids.tolist(), q.tolist()

    def verify_exact(self, logits: torch.Tensor, draft: list[int], start: int,
                     q: list[tuple[list[int], list[float]]]) -> tuple[list[int], int]:
        """One exact-mode verify pass over logits [len(draft) + 1, vocab] predicting positions start, ...:
        the accepted prefix of `draft` plus the verifier's own next token, and how many were accepted. It runs
        where the logits are, and copies two numbers to the host."""
        import torch

        n, device = len(draft), logits.device
        positions = list(range(start, start + n + 1))
        p = self.probs(logits)
        # The draft's distributions, dense; the row after the last draft token stays zero, so that its residual
        # is the verifier's own distribution: what it samples when every guess is accepted.
        dense = torch.zeros_like(p)
        if n:
            rows = torch.tensor([i for i, (ids, _) in enumerate(q) for _ in ids], device=device)
            cols = torch.tensor([t for ids, _ in q for t in ids], device=device)
            dense[rows, cols] = torch.tensor([x for _, probs in q for x in probs], dtype=p.dtype, device=device)
        accept = uniforms(self.seed, positions, ACCEPT, device=device)
        resample = uniforms(self.seed, positions, RESIDUAL, device=device)
        guesses = torch.tensor(draft, dtype=torch.long, device=device)
        steps = torch.arange(n, device=device)
        # Accepted with probability min(1, p(x) / q(x)); the first rejection ends the pass.
        rejected = ~(accept[:n] * dense[steps, guesses] < p[steps, guesses])
        first = torch.where(rejected.any(), rejected.int().argmax(), n) if n else torch.tensor(0, device=device)
        residual = (p[first] - dense[first]).clamp(min=0)
        token = _draw(torch.where(residual.sum() > 0, residual, p[first]), resample[first])
        accepted, token = torch.stack([first, token]).tolist()
        return draft[:accepted] + [token], accepted


GREEDY = Sampling()


def requested(mode: str | None, temperature: float, top_k: int, top_p: float, seed: int) -> Sampling:
    """Sampling as a request asks for it: no mode means greedy at temperature 0, else exact. Raises ValueError
    naming every parameter that can't be served."""
    mode = mode or (Mode.GREEDY if temperature == 0 else Mode.EXACT)
    sampling = Sampling(mode, temperature, top_k, top_p, seed if mode != Mode.GREEDY else 0)
    problems = sampling.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return sampling


def sampling_of(assign) -> Sampling:
    """A worker's sampling for a request, from its Assign."""
    return Sampling(assign.sampling_mode, assign.temperature, assign.top_k, assign.top_p, assign.seed)


def proposal_problem(mode: str, tokens: list[int], q_ids: list[list[int]], q_probs: list[list[float]],
                     vocab_size: int) -> str | None:
    """Why a proposal can't be used, or None. Rejection sampling trusts the distributions, so they are checked."""
    if any(t >= vocab_size for t in tokens):
        return "token ids outside the vocabulary"
    if mode != Mode.EXACT:
        return "distributions are only sent in exact mode" if q_ids or q_probs else None
    if len(q_ids) != len(tokens) or len(q_probs) != len(tokens):
        return "exact mode needs one distribution per token"
    for token, ids, probs in zip(tokens, q_ids, q_probs):
        if len(ids) != len(probs) or not ids or len(ids) > DRAFT_TOP or len(set(ids)) != len(ids):
            return "a distribution's ids and probabilities don't pair up"
        if any(t >= vocab_size for t in ids):
            return "a distribution names token ids outside the vocabulary"
        if any(not 0 <= x <= 1 for x in probs) or abs(sum(probs) - 1) > 1e-6:
            return "a distribution's probabilities don't sum to 1"
        if token not in ids or probs[ids.index(token)] <= 0:
            return "a token has no probability in its own distribution"
    return None
