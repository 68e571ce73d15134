"""Weight-only quantization: the quantized weights, the native model that serves them, and the settings that ask
for them (their batch invariance is tested with the other kernels' in test_native)."""
import pytest
import torch
from conftest import kernel_paths
from safetensors.torch import load_file, save_file
from test_native import CONFIGS, save

from amusd_mq.config import ConfigurationError
from amusd_mq.runtime import kernels
from amusd_mq.runtime.lm import Feed
from amusd_mq.runtime.load import load

QUANTIZED = list(kernels.QUANTIZED.values())


def dequantized(path: kernels.Path, weight: torch.Tensor) -> torch.Tensor:
    """The weight a quantized path computes with, read back through its own kernel: the identity times it."""
    return path.apply(torch.eye(weight.shape[1]), path.prepare(weight), None).t()


def test_the_settings_offer_every_quantization_there_is():
    from amusd_mq import config

    assert set(kernels.QUANTIZED) == set(config.QUANTS) - {"none"}


@pytest.mark.parametrize("path", QUANTIZED, ids=lambda p: p.name)
def test_quantized_weights_round_to_their_nearest_level(path):
    torch.manual_seed(0)
    weight = torch.randn(50, 64)  # 50 output channels: int4 pads them to a multiple of 16
    weight[3] = 0  # a channel of zeros must not divide by zero
    back = dequantized(path, weight)
    assert back.shape == weight.shape and torch.all(back[3] == 0)
    if path is kernels.INT8:
        step = weight.abs().amax(1, keepdim=True) / 127
    else:
        groups = weight.view(50, -1, kernels.INT4_GROUP)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(kernels.INT4_GROUP, 1)
    assert torch.all((back - weight).abs() <= step / 2 + 1e-6)
    assert (back - weight).abs().max() > 0  # it is quantized


@pytest.mark.parametrize("path", QUANTIZED, ids=lambda p: p.name)
def test_a_quantized_path_computes_with_its_dequantized_weight_and_the_bias(path):
    torch.manual_seed(1)
    weight, bias, x = torch.randn(48, 96), torch.randn(48), torch.randn(2, 3, 96)
    y = path.apply(x, path.prepare(weight), bias)
    assert y.shape == (2, 3, 48)
    assert torch.allclose(y, x @ dequantized(path, weight).t() + bias, atol=1e-4)


@pytest.mark.parametrize("quant", sorted(kernels.QUANTIZED))
@pytest.mark.parametrize("name", ["llama untied, GQA", "qwen2 tied, q/k/v bias"])
def test_a_quantized_model_is_the_model_of_its_dequantized_weights(tmp_path, name, quant):
    """Every linear layer, the head included (a tied head quantized as a copy, the embedding left as it is), and
    nothing else."""
    path = save(tmp_path / "model", *CONFIGS[name])
    weights = load_file(f"{path}/model.safetensors")
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    for key, weight in weights.items():
        if weight.dim() == 2 and key != "model.embed_tokens.weight":
            weights[key] = dequantized(kernels.QUANTIZED[quant], weight).contiguous()
    save_file(weights, f"{path}/model.safetensors")
    reference = load(path, "cpu", "float32", max_context=64)
    save(tmp_path / "model", *CONFIGS[name])  # the original weights again
    quantized = load(path, "cpu", "float32", max_context=64, quant=quant)
    assert kernel_paths(quantized.kernels) == {quant}
    assert quantized.model.weight_bytes() < reference.model.weight_bytes()
    seq = list(range(3, 40))
    with reference.session() as a, quantized.session() as b:
        assert torch.allclose(quantized.logits([Feed(b, seq, 5)])[0], reference.logits([Feed(a, seq, 5)])[0],
                              atol=1e-4)


def test_quantization_asked_where_it_cannot_run_is_a_configuration_error(tmp_path):
    path = save(tmp_path, *CONFIGS["llama untied, GQA"])
    with pytest.raises(ConfigurationError, match="native runner"):
        load(path, "cpu", "float32", runner="hf", quant="int8")
    with pytest.raises(ConfigurationError, match="AMUSD_KERNELS=onednn"):
        load(path, "cpu", "float32", kernels="onednn", quant="int4")
