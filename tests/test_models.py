import pytest
import torch

from cxrdebias.config import ModelConfig
from cxrdebias.models import SimpleConvNet, build_model


def test_simple_conv_outputs_logits_and_unit_features():
    m = SimpleConvNet(10, kernel_size=7)
    out = m(torch.randn(5, 3, 28, 28))
    assert out.logits.shape == (5, 10) and out.features.shape == (5, 128)
    assert torch.allclose(out.features.norm(dim=1), torch.ones(5), atol=1e-5)


def test_architecture_matches_reference():
    m = SimpleConvNet(10, kernel_size=7)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (7, 7) and c.stride == (1, 1) and c.padding == (3, 3) for c in convs)
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 4


def test_tanh_features_can_be_negative_relu_cannot():
    x = torch.randn(8, 3, 28, 28)
    relu = SimpleConvNet(10, last_activation="relu", normalize_features=False)
    tanh = SimpleConvNet(10, last_activation="tanh", normalize_features=False)
    assert (relu(x).features >= 0).all()
    assert (tanh(x).features < 0).any() and (tanh(x).features.abs() <= 1).all()


def test_build_model_takes_activation_from_method():
    m = build_model(ModelConfig(), 10, feature_activation="tanh")
    assert isinstance(m.extractor[-1], torch.nn.Tanh)
    m = build_model(ModelConfig(), 10)
    assert isinstance(m.extractor[-1], torch.nn.ReLU)
    m = build_model(ModelConfig(last_activation="relu"), 10, feature_activation="tanh")
    assert isinstance(m.extractor[-1], torch.nn.ReLU)


def test_one_by_one_kernel_is_the_biased_network():
    m = SimpleConvNet(10, kernel_size=1)
    assert all(c.kernel_size == (1, 1) for c in m.modules() if isinstance(c, torch.nn.Conv2d))
    with pytest.raises(ValueError):
        SimpleConvNet(10, kernel_size=4)
