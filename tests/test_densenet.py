"""DenseNet-121 for 1-channel CXR: outputs, EnD bottleneck, local pretrained weights."""

import pytest
import torch
from torchvision.models import densenet121

from cxrdebias.errors import CheckpointError
from cxrdebias.models.densenet import DenseNet121, load_pretrained_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DenseNet121(2, last_activation="tanh").eval()


def test_outputs_and_normalised_bottleneck(model):
    out = model(torch.randn(2, 1, 64, 64))
    assert out.logits.shape == (2, 2) and out.features.shape == (2, 1024)
    assert torch.allclose(out.features.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (out.features < 0).any()  # Tanh last activation: features can be negative


def test_head_is_two_layer_mlp(model):
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(1024, 256), (256, 2)]


def test_feature_map_is_last_activation(model):
    fmap = model.feature_map(torch.randn(1, 1, 64, 64))
    assert fmap.shape == (1, 1024, 2, 2) and fmap.abs().max() <= 1


def test_loads_torchvision_rgb_weights_and_adapts_first_conv(tmp_path):
    torch.manual_seed(1)
    tv = densenet121(weights=None)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    m = DenseNet121(2)
    report = load_pretrained_backbone(m, path)
    assert report["conv0_adapted_to_1_channel"]
    assert torch.allclose(m.features.conv0.weight, tv.features.conv0.weight.sum(1, keepdim=True))
    # a grey image in 1 channel gives the same features as the RGB model on the replicated image
    tv.eval(), m.eval()
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(m.features(x), tv.features(x.repeat(1, 3, 1, 1)), atol=1e-4)


def test_loads_wrapped_and_old_style_keys(tmp_path):
    tv = densenet121(weights=None)
    sd = {}
    for k, v in tv.state_dict().items():
        k = k.replace("denselayer1.norm1", "denselayer1.norm.1")  # early torchvision naming
        sd["module." + k] = v
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd}, path)
    load_pretrained_backbone(DenseNet121(2), path)


def test_refuses_other_architectures(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "r18.pt"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="no 'features"):
        load_pretrained_backbone(DenseNet121(2), path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_pretrained_backbone(DenseNet121(2), bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_backbone(DenseNet121(2), tmp_path / "missing.pt")
