"""Grad-CAM for the package's pooled-feature classifiers, computed without autograd.

Grad-CAM (Selvaraju et al., 2017, Eq. 1–2) for class ``c`` at the feature map ``A`` (``K``
channels, ``H × W``)::

    α_k = 1/(HW) · Σ_ij ∂y_c/∂A_kij                                    (Eq. 1)
    L   = ReLU(Σ_k α_k A_k)                                             (Eq. 2)

For the models of :mod:`cxrdebias.models` the logits are ``head(bottleneck(pool(A)))`` with
global average pooling ``p_k = 1/(HW) · Σ_ij A_kij``, so ``∂y_c/∂A_kij = g_k/(HW)`` with
``g = ∂y_c/∂p`` the same at every location, and Eq. 1 becomes ``α_k = g_k/(HW)``. ``g`` is
a product of Jacobians that the forward pass already has:

- the head ``Linear → ReLU → Dropout → … → Linear``: backwards from ``e_c``, a Linear layer
  multiplies by its weight (``v ← v W``), a ReLU by the mask of its positive inputs, Dropout is
  the identity in eval mode — giving ``v = ∂y_c/∂z`` for the bottleneck ``z``;
- the bottleneck: ``z = p`` (Flatten: ``g = v``) or EnD's L2 normalisation
  ``z = p / max(‖p‖, ε)``, whose Jacobian is ``(I − z zᵀ)/‖p‖`` (``I/ε`` when ``‖p‖ ≤ ε``), so
  ``g = (v − z (z·v)) / max(‖p‖, ε)``.

``A`` is the output of the model's *last activation* (:meth:`feature_map`: ReLU, or EnD's
Tanh), so the Tanh's own Jacobian is not part of ``g``: it lies before the target layer.

:class:`GradCAMModel` computes class probabilities and this CAM in one forward pass of plain
tensor operations, which is what makes a single ONNX graph with both outputs possible
(:mod:`cxrdebias.deploy.export`). The CAM is upsampled bilinearly to the input size (MONAI's
``default_upsampler``) and scaled per image to ``[0, 1]`` (min → 0, max → 1; a constant map
→ 0), like MONAI's ``ScaleIntensity``. :func:`monai_gradcam` is the reference it is checked
against: MONAI's autograd ``GradCAM`` on the unchanged torch model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cxrdebias.errors import ExportError
from cxrdebias.models.base import L2Normalize

#: the modules an analytic head backward pass understands
_HEAD_LAYERS = (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten)


def _head_layers(head: nn.Module) -> list[nn.Module]:
    """The head as a flat list of supported layers (``ExportError`` for anything else)."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    for layer in layers:
        if not isinstance(layer, _HEAD_LAYERS):
            raise ExportError(
                f"in-graph Grad-CAM supports heads of Linear/ReLU/Dropout layers, found {type(layer).__name__}"
            )
    return layers


def head_forward_and_gradient(
    layers: list[nn.Module], z: torch.Tensor, class_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the head and ``∂logit[class_index]/∂z`` per sample (N×D), without autograd."""
    relu_inputs: list[torch.Tensor | None] = []
    h = z
    for layer in layers:
        relu_inputs.append(h if isinstance(layer, nn.ReLU) else None)
        if isinstance(layer, nn.Linear | nn.ReLU):  # Dropout/Identity/Flatten(N×D): identity here
            h = F.linear(h, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else F.relu(h)
    v = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)[class_index].expand_as(h)  # e_c
    for layer, pre in zip(reversed(layers), reversed(relu_inputs), strict=True):
        if isinstance(layer, nn.Linear):
            v = v @ layer.weight
        elif pre is not None:
            v = v * (pre > 0).to(v.dtype)
    return h, v


def bottleneck_forward_and_gradient(
    bottleneck: nn.Module, pooled: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = bottleneck(pooled)`` and, given ``v = ∂y/∂z``, ``g = ∂y/∂pooled`` (see module doc)."""
    if isinstance(bottleneck, nn.Flatten):
        return pooled, v
    if not isinstance(bottleneck, L2Normalize):
        raise ExportError(f"in-graph Grad-CAM supports Flatten or L2Normalize bottlenecks, found {type(bottleneck).__name__}")
    norm = pooled.norm(dim=1, keepdim=True)
    denom = norm.clamp_min(bottleneck.eps)
    z = pooled / denom
    if v is None:
        return z, None
    inside = (norm > bottleneck.eps).to(v.dtype)  # below ε the clamp is constant: Jacobian I/ε
    return z, (v - inside * z * (z * v).sum(dim=1, keepdim=True)) / denom


def unit_scale(cam: torch.Tensor) -> torch.Tensor:
    """Per image (dim 0) ``(x − min)/(max − min)``; a constant image becomes 0 (MONAI's rule)."""
    dims = tuple(range(1, cam.dim()))
    low = cam.amin(dim=dims, keepdim=True)
    span = cam.amax(dim=dims, keepdim=True) - low
    tiny = torch.finfo(cam.dtype).tiny
    return (cam - low) / span.clamp_min(tiny)  # span 0 ⇒ numerator 0 ⇒ 0


class GradCAMModel(nn.Module):
    """``x → (class probabilities N×K, Grad-CAM of class ``class_index`` N×H×W in [0, 1])``.

    Wraps a model with ``feature_map``, ``pool`` (global average), ``bottleneck`` (Flatten or
    :class:`L2Normalize`) and a Linear/ReLU/Dropout ``head`` — every model of
    :mod:`cxrdebias.models` used for CXR. Eval-mode semantics (Dropout off, BatchNorm running
    statistics); no autograd, so it traces into one ONNX graph. See the module doc for the maths.
    """

    def __init__(self, model: nn.Module, class_index: int = 1):
        super().__init__()
        pool = getattr(model, "pool", None)
        if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
            raise ExportError("in-graph Grad-CAM needs a model whose features are globally average-pooled")
        self.model = model.eval()
        self.layers = _head_layers(model.head)
        bottleneck_forward_and_gradient(model.bottleneck, torch.zeros(1, 1))  # type check only
        self.class_index = class_index

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (N×K), Grad-CAM at the feature-map resolution (N×h×w, not normalised) and the
        bottleneck features ``z`` (N×D, what the model returns as ``features``)."""
        fmap = self.model.feature_map(x)
        pooled = fmap.mean(dim=(2, 3))
        z, _ = bottleneck_forward_and_gradient(self.model.bottleneck, pooled)
        logits, v = head_forward_and_gradient(self.layers, z, self.class_index)
        _, g = bottleneck_forward_and_gradient(self.model.bottleneck, pooled, v)
        alpha = g / (fmap.shape[2] * fmap.shape[3])  # Eq. 1 with ∂p_k/∂A_kij = 1/(HW)
        return logits, F.relu(torch.einsum("nk,nkhw->nhw", alpha, fmap)), z  # Eq. 2

    def raw_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N×K) and Grad-CAM at the feature-map resolution (N×h×w, not normalised)."""
        logits, cam, _ = self.parts(x)
        return logits, cam

    @staticmethod
    def finish_cam(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The raw CAM upsampled bilinearly to the input size and scaled to [0, 1] per image."""
        cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return unit_scale(cam.squeeze(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.raw_cam(x)
        return logits.softmax(dim=1), self.finish_cam(cam, x)


class _Logits(nn.Module):
    """The model with a plain-tensor output (MONAI's hooks expect logits, not a ModelOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def monai_gradcam(model: nn.Module, x: torch.Tensor, class_index: int = 1, target_layer: str = "activation") -> torch.Tensor:
    """MONAI's autograd ``GradCAM`` of ``class_index`` at ``model.<target_layer>`` (N×H×W, [0, 1]).

    Runs on a copy of ``model`` (MONAI leaves its hooks on the module). MONAI's
    ``default_normalizer`` maps max → 0 and min → 1 (documented there); here the per-image
    scaling is MONAI's ``ScaleIntensity(minv=0, maxv=1)`` so that 1 marks the strongest evidence,
    as in :class:`GradCAMModel`.
    """
    import numpy as np
    from monai.transforms import ScaleIntensity
    from monai.visualize import GradCAM

    scale = ScaleIntensity(minv=0.0, maxv=1.0)

    def per_image(maps: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.stack([scale(m) for m in maps.detach().cpu().numpy()]))

    wrapped = _Logits(copy.deepcopy(model)).eval()
    cam = GradCAM(wrapped, target_layers=f"model.{target_layer}", postprocessing=per_image)
    return cam(x, class_idx=class_index).squeeze(1)
