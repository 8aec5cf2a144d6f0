"""Probe points (issue 21 item 3): every backbone names its stages, and their globally
average-pooled outputs are read by forward hooks that never outlive the call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrdebias.data.base import Batch
from cxrdebias.models.densenet import DenseNet121
from cxrdebias.models.pooled import capture_pooled, pooled_outputs, probe_layers
from cxrdebias.models.resnet import ResNet18
from cxrdebias.models.simple_conv import SimpleConvNet
from cxrdebias.training.inference import predict


class Tiny(nn.Module):
    """x (N×1×2×2) → Dropout(0.9) → 1×1 conv with weights 1 and 2 → 2×2 max pool → flatten.

    In eval mode the dropout is the identity, so the pooled outputs are hand-checkable:
    ``scale`` averages x and 2x, ``peak`` holds the maxima of x and 2x, ``flat`` is 2-D already."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.scale = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.scale.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        self.peak = nn.MaxPool2d(2)
        self.flat = nn.Flatten(1)
        self.fail = fail
        self.grad_enabled: bool | None = None
        self.probe_layers = {"scale": "scale", "peak": "peak", "flat": "flat"}

    def forward(self, x):
        self.grad_enabled = torch.is_grad_enabled()
        h = self.peak(self.scale(self.drop(x)))
        if self.fail:
            raise RuntimeError("boom")
        return self.flat(h)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


X = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]], [[[0.0, 0.0], [0.0, -4.0]]]])  # means 3 and -1, maxima 6 and 0


def test_pooled_outputs_are_the_spatial_means_of_each_layer_in_eval_mode_without_gradients():
    model = Tiny().train()
    out = pooled_outputs(model, X)
    assert list(out) == ["scale", "peak", "flat"]
    assert torch.equal(out["scale"], torch.tensor([[3.0, 6.0], [-1.0, -2.0]]))
    assert torch.equal(out["peak"], torch.tensor([[6.0, 12.0], [0.0, 0.0]]))  # 1×1 maps: the mean is the value
    assert torch.equal(out["flat"], torch.tensor([[6.0, 12.0], [0.0, 0.0]]))  # already N×C
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in out.values())
    assert model.training and model.grad_enabled is False and _hooks(model) == 0
    # a subset, in the order asked
    assert list(pooled_outputs(model, X, {"p": "peak", "d": "scale"})) == ["p", "d"]


def test_the_hooks_are_removed_and_the_mode_restored_on_an_error():
    model = Tiny(fail=True).train()
    with pytest.raises(RuntimeError, match="boom"):
        pooled_outputs(model, X)
    assert _hooks(model) == 0 and model.training
    model.fail = False
    with pytest.raises(KeyError):  # an error inside the `with` block
        with capture_pooled(model, probe_layers(model)):
            assert _hooks(model) == 3
            raise KeyError("inside")
    assert _hooks(model) == 0


def test_unknown_modules_are_refused():
    model = Tiny()
    with pytest.raises(ValueError, match="no module named 'nope'"):
        pooled_outputs(model, X, {"a": "nope"})
    model.probe_layers = {"a": "scale", "b": "head.0"}
    with pytest.raises(ValueError, match=r"Tiny.probe_layers\['b'\] = 'head.0': the model has no module"):
        probe_layers(model)
    assert probe_layers(nn.Linear(2, 2)) == {} and _hooks(model) == 0


@pytest.mark.parametrize(
    ("model", "names", "widths"),
    [
        (lambda: DenseNet121(in_channels=1, hidden_dim=8), ["block1", "block2", "block3", "block4"], [128, 256, 512, 1024]),
        (lambda: ResNet18(in_channels=1), ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
        (lambda: SimpleConvNet(2, in_channels=1, kernel_size=3), ["block1", "block2", "block3", "block4"], [16, 32, 64, 128]),
    ],
    ids=["densenet121", "resnet18", "simple_conv"],
)
def test_each_backbone_names_its_stages_and_the_last_one_is_the_bottleneck_before_normalisation(model, names, widths):
    torch.manual_seed(0)
    m = model()
    x = torch.randn(3, 1, 64, 64)
    out = pooled_outputs(m, x)
    assert list(out) == names and [v.shape for v in out.values()] == [(3, w) for w in widths]
    with torch.no_grad():
        bottleneck = m.eval()(x).features  # L2-normalised pooled last feature map
    assert torch.allclose(F.normalize(out[names[-1]], dim=1), bottleneck, atol=1e-5)
    assert _hooks(m) == 0


def test_predict_keeps_the_pooled_layers_of_every_batch_in_order():
    model = Tiny()

    class Out(nn.Module):  # predict wants ModelOutput-like outputs (logits, features)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            from cxrdebias.models.base import ModelOutput

            z = self.inner(x)
            return ModelOutput(z, z)

    wrapped = Out(model).train()
    batches = [
        Batch(image=X[i : i + 1], target=torch.tensor([i]), bias=torch.tensor([0]), index=torch.tensor([i])) for i in range(2)
    ]
    p = predict(wrapped, batches, layers={"scale": "inner.scale"})
    assert list(p.layers) == ["scale"] and torch.equal(p.layers["scale"], torch.tensor([[3.0, 6.0], [-1.0, -2.0]]))
    assert _hooks(wrapped) == 0 and wrapped.training
    assert predict(wrapped, batches).layers is None
