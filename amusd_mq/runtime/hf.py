"""The reference runner: transformers' own model in eager mode, one DynamicCache per slot, one row at a time."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from .lm import LM, ModelInfo, Row


class HFLM(LM):
    runner = "hf"

    def __init__(self, model, info: ModelInfo, slots: int, tokenizer=None):
        super().__init__(info, slots, tokenizer)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.caches: dict[int, DynamicCache] = {}
        # Newer releases call the cache argument `cache`; older ones only know `past_key_values`.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def open_slot(self) -> int:
        slot = super().open_slot()
        self.caches[slot] = DynamicCache()
        return slot

    def free_slot(self, slot: int) -> None:
        self.caches.pop(slot, None)
        super().free_slot(slot)

    @torch.inference_mode()
    def step(self, rows: list[Row]) -> list[torch.Tensor]:
        out = []
        for row in rows:
            cache = self.caches[row.slot]
            held = cache.get_seq_length()
            if row.start > held:
                raise ValueError(f"row starts at {row.start}, past the {held} positions its cache holds")
            if row.start < held:
                cache.crop(row.start - held)  # a negative count works on every transformers release
            feed = torch.tensor([row.tokens], device=self.device)
            logits = self.model(input_ids=feed, use_cache=True, logits_to_keep=row.n_out,
                                **{self._cache_arg: cache}).logits
            out.append(logits[0].float())
        return out
