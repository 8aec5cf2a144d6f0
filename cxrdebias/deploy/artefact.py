"""The trained-model file of a CXR run (``model.pt``): what it holds and how it is read back.

``evaluate``, ``export`` and ``analyze-bias`` read a run through this module; the CXR training
protocol (:mod:`cxrdebias.experiments.protocols.cxr`) writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cxrdebias.config import ModelConfig
from cxrdebias.errors import CheckpointError
from cxrdebias.models import build_model
from cxrdebias.training.runs import torch_load_checked

MODEL_FILE = "model.pt"
#: the patient-level train/val/test assignment of a CXR run (one row per manifest row)
SPLITS_FILE = "splits.csv"
MODEL_FORMAT = 1
#: the column of the positive class in an artefact's ``class_names`` (the pipeline's class order: negative, positive)
POSITIVE_INDEX = 1


def load_model_artefact(run_or_file: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model (eval mode) and its metadata from a run folder or a ``model.pt``."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / MODEL_FILE
    art = torch_load_checked(path)
    if not isinstance(art, dict) or art.get("format") != MODEL_FORMAT or "state_dict" not in art:
        raise CheckpointError(f"{path}: not a cxrdebias model artefact (format {MODEL_FORMAT})")
    model = build_model(
        ModelConfig.model_validate({**art["model_config"], "pretrained": None}),  # weights come from the artefact
        art["num_classes"],
        in_channels=art["in_channels"],
        feature_activation=art["feature_activation"],
    )
    try:
        model.load_state_dict(art["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture ({exc})") from None
    return model.eval(), art
