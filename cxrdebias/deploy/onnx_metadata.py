"""What an exported ONNX model promises: its input/output names and its metadata.

The contract between :mod:`cxrdebias.deploy.export` (writes it) and :mod:`cxrdebias.deploy.runtime` (reads
it). Torch-free. The graph has one input and three outputs (format 1, before the guard: the first
two only):

- ``image``: float32 ``batch × C × S × S``, the output of
  :func:`cxrdebias.data.preprocess.preprocess` with the spec stored in the metadata;
- ``probabilities``: float32 ``batch × K``, softmax of the logits;
- ``cam``: float32 ``batch × S × S``, Grad-CAM of the positive class scaled to ``[0, 1]`` per
  image, in the model-input geometry (see :class:`~cxrdebias.data.preprocess.ResizeGeometry`);
- ``ood_score``: float32 ``batch``, how far the image lies from the training data (higher =
  further; flagged above the metadata's ``ood_threshold``; :mod:`cxrdebias.deploy.guard`).

The probabilities are ``softmax(logits / temperature)`` (metadata ``temperature``; 1 in format 1).

Metadata are ONNX ``metadata_props``: string keys, JSON-encoded values (:data:`KEYS` lists
them; NaN is written as ``null``). :meth:`ModelMetadata.from_props` parses and checks the
keys the runtime needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.errors import CheckpointError

#: version of this metadata layout; bump when a key changes meaning
FORMAT_VERSION = 2
#: formats this version reads: 1 = two outputs (no OOD score, no temperature), 2 = three outputs
READABLE_FORMATS = (1, 2)
FORMAT_KEY = "cxrdebias_format"
INPUT_NAME = "image"
PROBABILITIES = "probabilities"
CAM = "cam"
OOD_SCORE = "ood_score"
OUTPUT_NAMES = (PROBABILITIES, CAM, OOD_SCORE)
#: the outputs of a format-1 model (and of a format-2 model exported without the guard)
LEGACY_OUTPUT_NAMES = (PROBABILITIES, CAM)

#: every metadata key an export writes, with what its JSON value holds
KEYS: dict[str, str] = {
    FORMAT_KEY: "metadata layout version (int)",
    "model_version": "name of this model version (str)",
    "labels": "class names in output order (list of str)",
    "positive_label": "the class whose probability is thresholded and whose Grad-CAM is output (str)",
    "threshold": "decision threshold on the positive-class probability (float)",
    "threshold_method": "how the threshold was chosen (str)",
    "preprocessing": "the full PreprocessSpec: image → model input (dict)",
    "method": "debiasing method and its options (dict)",
    "bias": "the bias label the method was given ('site' or 'none')",
    "sites": "sites seen in training: names, index mapping, where the site was read from (dict)",
    "validation": "model selection and validation metrics, overall and per site (dict)",
    "data_hash": "SHA-256 of the training data (str)",
    "code_version": "package version and git commit of training and of the export (dict)",
    "export": "export provenance and the parity checks it passed (dict)",
    "io": "input and output names, shapes and meaning (dict)",
    "intended_use": "what the model is for, and that it is NOT FOR CLINICAL USE (str)",
    "temperature": "temperature T of the probabilities softmax(logits / T), fitted on the validation split (float)",
    "ood_threshold": "an image is out of distribution when its ood_score is above this (float)",
    "ood_method": "how ood_score is computed (str: 'mahalanobis' or 'energy')",
    "training_sites": "names of the sites seen in training (list of str)",
}
#: the keys the runtime cannot work without
REQUIRED = (FORMAT_KEY, "model_version", "labels", "positive_label", "threshold", "preprocessing")


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/±inf floats replaced by ``None`` (strict JSON), recursively; numpy
    scalars become Python numbers."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def format_metric(value: Any) -> str:
    """A validation number of the metadata as the model card and the viewer show it: three
    decimals, ``n/a`` for a missing or non-finite value, other values as text."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def encode(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata dict → ONNX ``metadata_props`` (JSON strings); unknown keys are refused."""
    unknown = sorted(set(metadata) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown ONNX metadata key(s) {unknown}; add them to KEYS")
    return {k: json.dumps(json_safe(v), allow_nan=False, sort_keys=False) for k, v in metadata.items()}


@dataclass(frozen=True)
class ModelMetadata:
    """The parsed metadata of an exported model; ``raw`` holds every key, decoded."""

    model_version: str
    labels: tuple[str, ...]
    positive_label: str
    threshold: float
    preprocessing: PreprocessSpec
    raw: dict[str, Any]
    temperature: float = 1.0
    ood_threshold: float | None = None
    ood_method: str | None = None
    training_sites: tuple[str, ...] | None = None

    @property
    def positive_index(self) -> int:
        """Column of the positive class in the ``probabilities`` output."""
        return self.labels.index(self.positive_label)

    @property
    def negative_label(self) -> str:
        return next(label for label in self.labels if label != self.positive_label)

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> ModelMetadata:
        """Parse ONNX ``metadata_props``; :class:`CheckpointError` naming ``source`` if invalid."""
        missing = [k for k in REQUIRED if k not in props]
        if missing:
            raise CheckpointError(
                f"{source}: ONNX model without cxrdebias metadata (missing {', '.join(missing)}); "
                "export it with `cxrdebias export`"
            )
        raw: dict[str, Any] = {}
        for key, value in props.items():
            try:
                raw[key] = json.loads(value)
            except json.JSONDecodeError:
                raw[key] = value  # a foreign key (e.g. added by another tool) stays text
        if isinstance(raw[FORMAT_KEY], bool) or raw[FORMAT_KEY] not in READABLE_FORMATS:
            raise CheckpointError(
                f"{source}: metadata format {raw[FORMAT_KEY]!r}; this cxrdebias reads formats {', '.join(map(str, READABLE_FORMATS))}"
            )
        try:
            spec = PreprocessSpec.model_validate(raw["preprocessing"])
        except ValidationError as exc:
            raise CheckpointError(f"{source}: invalid preprocessing metadata ({exc.errors()[0]['msg']})") from None
        labels = raw["labels"]
        if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) and x.strip() for x in labels)):
            raise CheckpointError(f"{source}: metadata 'labels' must be two non-empty class names, got {labels!r}")
        if labels[0] == labels[1]:
            raise CheckpointError(f"{source}: metadata 'labels' repeats the class name {labels[0]!r}; expected two distinct classes")
        if raw["positive_label"] not in labels:
            raise CheckpointError(f"{source}: metadata 'positive_label' {raw['positive_label']!r} is not one of the labels {labels!r}")
        threshold = raw["threshold"]
        # bool is an int in Python: `true` must not be read as 1.0
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
            raise CheckpointError(f"{source}: metadata 'threshold' {threshold!r}; expected a number strictly between 0 and 1")
        temperature = _number(raw, "temperature", source, default=1.0, positive=True)
        ood_threshold = _number(raw, "ood_threshold", source, default=None)
        ood_method = raw.get("ood_method")
        if ood_method is not None and not isinstance(ood_method, str):
            raise CheckpointError(f"{source}: metadata 'ood_method' {ood_method!r}; expected a name")
        sites = raw.get("training_sites")
        if sites is not None and not (isinstance(sites, list) and all(isinstance(x, str) for x in sites)):
            raise CheckpointError(f"{source}: metadata 'training_sites' {sites!r}; expected a list of site names")
        return cls(
            str(raw["model_version"]), tuple(labels), raw["positive_label"], float(threshold), spec, raw,
            temperature=temperature, ood_threshold=ood_threshold, ood_method=ood_method,
            training_sites=tuple(sites) if sites is not None else None,
        )


def _number(raw: Mapping[str, Any], key: str, source: str, *, default: float | None, positive: bool = False) -> float | None:
    """An optional finite number of the metadata (``default`` when absent or null)."""
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (positive and value <= 0):
        raise CheckpointError(f"{source}: metadata {key!r} {value!r}; expected a finite {'positive ' if positive else ''}number")
    return float(value)
