"""The native runner: a purpose-built forward for the decoder architectures we serve (Llama, Qwen2) over a slot
KV cache, batched over rows, and on a GPU replayed from CUDA graphs.

The cache is preallocated, [layers, slots + 1, kv_heads, max_len, head_dim]. A row writes its tokens' keys and
values at their positions in its slot and attends to every position up to its own: entries past a rollback are
never seen before they are written again, so rolling back copies nothing. The last slot is scratch, where the
padding of a batch writes. Rows are right-aligned in a batch, so every row's last n_out tokens are its last
columns.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import kernels
from .lm import LM, ModelInfo, Row

log = logging.getLogger(__name__)
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
TOKEN_BUCKETS = (1, 2, 4, 8, 16)  # tokens per row that a CUDA graph is captured for; longer rows run eagerly


def row_buckets(slots: int) -> tuple[int, ...]:
    """Rows per step that a CUDA graph is captured for: powers of two up to the slots, and the slots."""
    return tuple(sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)}))
PREFILL_CHUNK = 512  # a long prefill runs in chunks of this many tokens, so its activations stay small
# So that a token's logits are the same bit for bit whether it is decoded alone or verified among others (greedy
# speculation then commits exactly what plain decoding would, bf16 included), attention is given shapes that
# torch's CPU flash-attention kernel reduces alike: keys in whole blocks of its 512 (it reduces a lone shorter
# block in another order; positions past a row's own are masked), and queries per key-value head in a multiple of 4
# (it splits them into blocks of 32 or more, and computes a block of 1-3 in another order). The linear layers get
# the same from runtime.kernels.
KEY_BLOCK = 512
QUERY_MULTIPLE = 4


class UnsupportedModel(ValueError):
    """The native runner doesn't know this architecture or one of its options."""


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """The inverse frequencies of the config's RoPE: default, linear or llama3 scaling."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        between = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise UnsupportedModel(f"rope_type {kind!r} is not supported by the native runner")


LINEARS = ("qkv", "o", "gate_up", "down", "head")  # the linear layers by role: each role's weights share a shape


@dataclass
class Layer:
    qkv: torch.Tensor  # q, k and v projections in one matrix: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # gate and up projections in one matrix
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


class NativeModel:
    def __init__(self, config, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 slots: int, max_len: int, kernels: str = "auto", quant: str = "none"):
        arch = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
        if arch not in ARCHITECTURES:
            raise UnsupportedModel(f"{arch}: the native runner serves {', '.join(ARCHITECTURES)}")
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModel("sliding-window attention is not supported by the native runner")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config.hidden_act!r} is not supported by the native runner")
        # Copies: what safetensors loads on a CPU maps the file, and one tensor kept from it (a norm's weight) would
        # keep the whole file in the process's memory beside the prepared weights (3.1 GB for the 1.5B).
        w = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in weights.items()}
        self.device, self.dtype = device, dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.slots, self.max_len = slots, max_len
        self.embed = w.pop("model.embed_tokens.weight")
        self.tied = "lm_head.weight" not in w  # the head is the embedding when the directory has none of its own
        self.head = w.pop("lm_head.weight", self.embed)
        self.norm = w.pop("model.norm.weight")
        self.layers = [self._layer(w, i) for i in range(config.num_hidden_layers)]
        unused = [k for k in w if not k.endswith("rotary_emb.inv_freq")]
        if unused:
            raise UnsupportedModel(f"weights the native runner doesn't know what to do with: {unused[:4]}")
        self.linears, self.batch_invariant = self._choose_kernels(kernels, quant)
        self.inv_freq = rope_inv_freq(config, self.head_dim).to(device=device, dtype=torch.float32)
        shape = (len(self.layers), slots + 1, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    @classmethod
    def from_directory(cls, path: str | Path, config, device: torch.device, dtype: torch.dtype, slots: int,
                       max_len: int, kernels: str = "auto", quant: str = "none") -> "NativeModel":
        path = Path(path)
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "model.safetensors"]
        weights = {}
        for name in files:
            weights.update(load_file(str(path / name), device=str(device)))
        return cls(config, weights, device, dtype, slots, max_len, kernels, quant)

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], i: int) -> Layer:
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        biases = [w.pop(f"{a}{x}_proj.bias", None) for x in "qkv"]
        if any(b is not None for b in biases) and any(b is None for b in biases):
            raise UnsupportedModel("a bias on some of q, k and v but not all")
        if f"{m}gate_proj.bias" in w:
            raise UnsupportedModel("MLP biases are not supported by the native runner")
        return Layer(
            qkv=torch.cat([w.pop(f"{a}{x}_proj.weight") for x in "qkv"]),
            qkv_bias=torch.cat(biases) if biases[0] is not None else None,
            o=w.pop(f"{a}o_proj.weight"), o_bias=w.pop(f"{a}o_proj.bias", None),
            gate_up=torch.cat([w.pop(f"{m}gate_proj.weight"), w.pop(f"{m}up_proj.weight")]),
            down=w.pop(f"{m}down_proj.weight"),
            attn_norm=w.pop(f"model.layers.{i}.input_layernorm.weight"),
            mlp_norm=w.pop(f"model.layers.{i}.post_attention_layernorm.weight"))

    def _choose_kernels(self, asked: str, quant: str) -> tuple[dict[str, kernels.Kernel], bool]:
        """Each linear role's kernel, timed over its own weights, and whether all of them are batch-invariant (as
        far as the linear layers go: forward shapes attention for it); its weights are then held as that kernel's
        path reads them, quantized where asked (a tied head gets a copy of its own, the embedding staying as it
        is)."""
        offered = kernels.candidates(self.device, self.dtype, asked, quant)
        chosen, timings, variant = {}, [], []
        for role in LINEARS:
            weights = [self.head] if role == "head" else [getattr(layer, role) for layer in self.layers]
            kernel, times, invariant = kernels.choose(weights, offered)
            chosen[role] = kernel
            if invariant is False:
                variant.append(role)
            if times:
                timings.append(f"{role} {kernel.name} (" + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + ")")
            if role == "head":
                self.head = kernel.path.prepare(self.head)
            else:
                for layer in self.layers:
                    setattr(layer, role, kernel.path.prepare(getattr(layer, role)))
        if timings:
            log.info("linear kernels (path/rows a smaller input is padded to), by ms per weight for one row: %s",
                     "; ".join(timings))
        if variant:
            log.warning("no %s kernel for %s here gives a row the same result in every batch size: speculation's "
                        "greedy output can differ from plain decoding's where two tokens nearly tie",
                        self.dtype, ", ".join(variant))
        return chosen, not variant

    @property
    def kernels(self) -> str:
        """The kernels of the linear layers, as reported: one name, or each role's."""
        names = {role: kernel.name for role, kernel in self.linears.items()}
        if len(set(names.values())) == 1:
            return next(iter(names.values()))
        return ",".join(f"{role}={name}" for role, name in names.items())

    @property
    def scratch(self) -> int:
        """The slot that padding writes to."""
        return self.slots

    def weight_bytes(self) -> int:
        """What one step must read from memory at least: every weight once."""
        weights = [self.head, self.norm] + ([] if self.tied else [self.embed])  # a tied head is read as its own copy
        for layer in self.layers:
            weights += [w for w in vars(layer).values() if w is not None]
        return sum(kernels.nbytes(w) for w in weights)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers computes it: normalised in float32, cast back, then scaled."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * weight

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                read_slots: torch.Tensor, keys: int, n_out: int) -> torch.Tensor:
        """Logits [rows, n_out, vocab] in the model's dtype, for the last n_out columns of tokens [rows, n] at
        positions [rows, n]. Each token's key and value go to its position in write_slots [rows, n]; each row
        attends over the first `keys` positions of slot read_slots[row], up to its own position.

        Few kernels per layer, since a step launches every one of them: q and k are rotated together, and the
        query heads that share a key-value head are stacked as one longer query against it (no copies of the
        keys and values per head)."""
        rows, n = tokens.shape
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        x = F.embedding(tokens, self.embed)
        angles = positions[..., None].float() * self.inv_freq  # [rows, n, hd / 2]
        cos = torch.cat([angles, angles], -1).cos().to(self.dtype)[:, :, None]  # [rows, n, 1, hd]
        sin = angles.sin()
        sin = torch.cat([-sin, sin], -1).to(self.dtype)[:, :, None]  # rotate_half(x) * sin == roll(x) * this
        visible = torch.arange(keys, device=tokens.device) <= positions[..., None]  # [rows, n, keys]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device).masked_fill_(~visible,
                                                                                                float("-inf"))
        mask = mask.repeat(1, group, 1)[:, None]  # [rows, 1, group * n, keys]: the stacked queries' order
        queries = group * n
        padding = -queries % QUERY_MULTIPLE
        mask = torch.cat([mask, mask[:, :, :1].expand(-1, -1, padding, -1)], 2) if padding else mask
        qk_size = (heads + kv_heads) * hd
        qkv_of, o_of, gate_up_of, down_of = (self.linears[r] for r in ("qkv", "o", "gate_up", "down"))
        for i, layer in enumerate(self.layers):
            qkv = qkv_of(self._rms(x, layer.attn_norm), layer.qkv, layer.qkv_bias)
            qk = qkv[..., :qk_size].view(rows, n, heads + kv_heads, hd)
            qk = qk * cos + torch.roll(qk, hd // 2, -1) * sin
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            self.k_cache[i][write_slots, :, positions] = k
            self.v_cache[i][write_slots, :, positions] = qkv[..., qk_size:].view(rows, n, kv_heads, hd)
            q = q.view(rows, n, kv_heads, group, hd).permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, queries, hd)
            if padding:
                q = torch.cat([q, q.new_zeros(rows, kv_heads, padding, hd)], 2)
            out = F.scaled_dot_product_attention(q, self.k_cache[i][read_slots, :, :keys],
                                                 self.v_cache[i][read_slots, :, :keys], attn_mask=mask)
            out = out[:, :, :queries].reshape(rows, kv_heads, group, n, hd)
            out = out.permute(0, 3, 1, 2, 4).reshape(rows, n, heads * hd)
            x = x + o_of(out, layer.o, layer.o_bias)
            gate, up = gate_up_of(self._rms(x, layer.mlp_norm), layer.gate_up, None).chunk(2, dim=-1)
            x = x + down_of(F.silu(gate) * up, layer.down, None)
        return self.linears["head"](self._rms(x[:, n - n_out:], self.norm), self.head, None)


class StepInputs:
    """Rows packed right-aligned into [rows, tokens] tensors; padding writes to the scratch slot."""

    def __init__(self, rows: list[Row], n_rows: int, n_tokens: int, scratch: int):
        self.tokens = torch.zeros(n_rows, n_tokens, dtype=torch.long)
        self.positions = torch.zeros(n_rows, n_tokens, dtype=torch.long)
        self.write_slots = torch.full((n_rows, n_tokens), scratch, dtype=torch.long)
        self.read_slots = torch.full((n_rows,), scratch, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            self.tokens[i, n_tokens - n:] = torch.tensor(row.tokens)
            self.positions[i, n_tokens - n:] = torch.arange(row.start, row.start + n)
            self.write_slots[i, n_tokens - n:] = row.slot
            self.read_slots[i] = row.slot

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.positions, self.write_slots, self.read_slots]

    def to(self, device: torch.device) -> list[torch.Tensor]:
        return [t.to(device) for t in self.tensors()]


class Graphs:
    """The forward captured once per (rows, tokens) bucket at warm-up; a step copies its padded batch into the
    bucket's static inputs and replays it. All graphs share one memory pool: they never run at once, and each
    step reads its outputs before the next replays."""

    def __init__(self, model: NativeModel):
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.row_buckets = row_buckets(model.slots)
        for n_rows in self.row_buckets:
            for n_tokens in TOKEN_BUCKETS:
                self._capture(n_rows, n_tokens)

    def _capture(self, n_rows: int, n_tokens: int) -> None:
        inputs = StepInputs([], n_rows, n_tokens, self.model.scratch).to(self.model.device)
        args = (*inputs, self.model.max_len, n_tokens)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs choose kernels and allocate outside the graph
            for _ in range(2):
                self.model.forward(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.forward(*args)
        self.captured[n_rows, n_tokens] = graph, inputs, out

    def run(self, rows: list[Row]) -> torch.Tensor | None:
        """Logits [rows, bucket's tokens, vocab], or None when no bucket holds the rows."""
        n_rows = next((b for b in self.row_buckets if b >= len(rows)), None)
        n_tokens = next((b for b in TOKEN_BUCKETS if b >= max(len(r.tokens) for r in rows)), None)
        if n_rows is None or n_tokens is None:
            return None
        graph, inputs, out = self.captured[n_rows, n_tokens]
        for static, value in zip(inputs, StepInputs(rows, n_rows, n_tokens, self.model.scratch).tensors()):
            static.copy_(value)
        graph.replay()
        return out


class NativeLM(LM):
    runner = "native"

    def __init__(self, model: NativeModel, info: ModelInfo, tokenizer=None):
        super().__init__(info, model.slots, tokenizer)
        self.model = model
        self.kernels = model.kernels
        self.graphs: Graphs | None = None

    def warm_up(self) -> None:
        if self.model.device.type == "cuda":
            log.info("capturing CUDA graphs for %d row and %d token buckets", len(row_buckets(self.model.slots)),
                     len(TOKEN_BUCKETS))
            self.graphs = Graphs(self.model)
        super().warm_up()

    def step(self, rows: list[Row]) -> list[torch.Tensor]:
        for row in rows:
            if row.start + len(row.tokens) > self.model.max_len:
                raise ValueError(f"a sequence of {row.start + len(row.tokens)} tokens exceeds the KV cache's "
                                 f"{self.model.max_len} positions (AMUSD_MAX_CONTEXT)")
        logits = self.graphs.run(rows) if self.graphs is not None else None
        if logits is None:
            if max(len(r.tokens) for r in rows) > PREFILL_CHUNK:
                return [self._prefill(row) for row in rows]
            logits = self._eager(rows)
        n_cols = logits.shape[1]
        return [logits[i, n_cols - row.n_out:].float() for i, row in enumerate(rows)]

    def _eager(self, rows: list[Row], n_out: int | None = None) -> torch.Tensor:
        n_tokens = max(len(r.tokens) for r in rows)
        seen = max(r.start + len(r.tokens) for r in rows)  # only the positions some row can see, in whole blocks
        keys = min(self.model.max_len, -(-seen // KEY_BLOCK) * KEY_BLOCK)
        batch = StepInputs(rows, len(rows), n_tokens, self.model.scratch)
        return self.model.forward(*batch.to(self.model.device), keys, n_out or max(r.n_out for r in rows))

    def _prefill(self, row: Row) -> torch.Tensor:
        """A long row, chunk by chunk: the logits come from the last chunk, which must hold all n_out tokens."""
        tokens, start = row.tokens, row.start
        while len(tokens) > PREFILL_CHUNK and len(tokens) - PREFILL_CHUNK >= row.n_out:
            self._eager([Row(row.slot, start, tokens[:PREFILL_CHUNK], 1)])
            tokens, start = tokens[PREFILL_CHUNK:], start + PREFILL_CHUNK
        return self._eager([Row(row.slot, start, tokens, row.n_out)])[0, -row.n_out:].float()
