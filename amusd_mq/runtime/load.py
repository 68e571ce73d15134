"""Loading a model directory with the runner asked for. transformers reads the config and the tokenizer for both
runners; the native runner reads the weights from the safetensors itself."""
from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from .. import models
from ..config import RUNNERS, Config, ConfigurationError
from ..text.vocab import Vocabulary, load_tokenizer
from .hf import HFLM
from .lm import DTYPES, LM, ModelInfo
from .native import NativeLM, NativeModel, UnsupportedModel

log = logging.getLogger(__name__)


def for_role(cfg: Config, role: str, runner_chosen: bool = False) -> LM:
    """The model a worker of `role` serves, as the settings describe it."""
    name, device = cfg.model_of(role)
    return load(name, device, cfg.dtype, cfg.cache_dir, cfg.runner, cfg.max_batch, cfg.max_context, runner_chosen,
                cfg.kernels, cfg.quant_of(role))


def warm_for_role(cfg: Config, role: str, runner_chosen: bool = False) -> LM:
    """The model a worker of `role` serves, warmed up: a model directory's, or the plugin's that serves its name."""
    served_by = models.plugin(cfg.model_of(role)[0])
    lm = for_role(cfg, role, runner_chosen) if served_by is None else served_by.model(cfg, role)
    log.info("%s: %s runner", lm.name, lm.runner)
    lm.warm_up()
    return lm


def load(name: str, device: str = "cpu", dtype: str = "float32", cache_dir: str | None = None,
         runner: str = "native", slots: int = 4, max_context: int = 4096, runner_chosen: bool = True,
         kernels: str = "auto", quant: str = "none") -> LM:
    """The model `name` (an alias, a directory or a hub id) on `device`, computed by `runner`, its linear layers'
    weights quantized as `quant` says. A model the native runner doesn't know is an error when `native` was chosen
    (runner_chosen) or quantization asked for, else it falls back to transformers."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, not {runner!r}")
    path = models.resolve(name, cache_dir)
    config = AutoConfig.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model config's own
        eos = config.eos_token_id
    info = ModelInfo(name=name, vocab_size=config.vocab_size,
                     max_context=min(config.max_position_embeddings, max_context),
                     eos_token_ids=sorted({eos} if isinstance(eos, int) else set(eos or [])),
                     vocab_hash=Vocabulary.of(tokenizer).hash)
    target, torch_dtype = torch.device(device), DTYPES[dtype]
    if quant != "none" and runner != "native":
        raise ConfigurationError(f"{quant} quantization needs the native runner, not {runner}")
    if runner == "native":
        try:
            model = NativeModel.from_directory(path, config, target, torch_dtype, slots, info.max_context, kernels,
                                               quant)
            return NativeLM(model, info, tokenizer)
        except UnsupportedModel as exc:
            if runner_chosen or quant != "none":
                raise
            log.warning("%s: %s; running it with transformers (the hf runner) instead", name, exc)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(target)
    return HFLM(model, info, slots, tokenizer)
