"""Inference with an exported model: onnxruntime + the preprocessing recorded in the model.

Torch-free on purpose: this module imports numpy, onnxruntime, Pillow and the torch-free
modules of the package only (image reading, preprocessing, the metadata contract), so that a
deployment needs neither torch nor a GPU build of it.

>>> model = load_model("model.onnx")                       # doctest: +SKIP
>>> model.provider, model.metadata.threshold                # doctest: +SKIP
('CPUExecutionProvider', 0.41)
>>> result = model.predict(["a.dcm", "b.png"], batch_size=16)  # doctest: +SKIP
>>> result.positive_probability, result.predicted_labels, result.cams.shape  # doctest: +SKIP

Inputs are read with :func:`cxrdebias.data.images.read_image` and turned into model inputs
with :func:`cxrdebias.data.preprocess.preprocess` and the :class:`PreprocessSpec` from the
model's metadata — never re-specified by hand. :func:`collect_inputs` expands folders
(recursively: PNG, JPEG and DICOM files) and manifests (CSV with a ``path`` column relative to
the manifest's folder; ``site``, ``label``, ``patient_id`` columns are carried along).
:func:`cxrdebias.deploy.predict.predict_to_csv` is ``cxrdebias predict``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cxrdebias.data.cxr.manifest import read_manifest_images
from cxrdebias.data.images import read_image
from cxrdebias.data.preprocess import PreprocessSpec, ResizeGeometry, preprocess, resize_geometry
from cxrdebias.deploy.onnx_metadata import (
    CAM,
    INPUT_NAME,
    LEGACY_OUTPUT_NAMES,
    OOD_SCORE,
    OUTPUT_NAMES,
    PROBABILITIES,
    ModelMetadata,
)
from cxrdebias.errors import CheckpointError, ConfigError, DataError

#: suffixes of the image files taken from a folder (DICOM files without a suffix are also
#: taken when they carry the ``DICM`` marker)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
#: manifest columns copied into the predictions
DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputImage:
    """One image to predict: a file (``path``) or an in-memory ``[0, 1]`` array (``pixels``).

    ``name`` is what the predictions call it; ``fields`` are the manifest's site/label/patient.
    """

    name: str
    path: Path | None = None
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    fields: dict[str, str] = field(default_factory=dict)


def _is_dicom_without_suffix(path: Path) -> bool:
    try:
        if not path.is_file():  # a FIFO would block the open below
            return False
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _folder_images(folder: Path) -> list[InputImage]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith("."):
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix == "" and _is_dicom_without_suffix(path)):
                found.append(InputImage(str(path), path))
    if not found:
        raise DataError(f"{folder}: no PNG, JPEG or DICOM files in this folder")
    return found


def _manifest_images(manifest: Path, allow_links_outside: bool) -> list[InputImage]:
    """The images a manifest lists, with their site/label/patient fields (the one manifest schema)."""
    listed = read_manifest_images(manifest, allow_links_outside=allow_links_outside)
    return [InputImage(str(path), path, fields=fields) for path, fields in listed]


def collect_inputs(inputs: Iterable[str | os.PathLike], *, allow_links_outside: bool = False) -> list[InputImage]:
    """Folders (recursive), manifests (``*.csv``) and image files → the images to predict.

    ``allow_links_outside``: a manifest's symbolic links may lead out of its folder
    (``--allow-outside``; :func:`~cxrdebias.data.cxr.manifest.read_manifest_images`).

    Raises:
        DataError: a missing input, an empty folder or manifest, a manifest without ``path``
            column or with a row whose file is missing or outside the manifest's folder.
    """
    found: list[InputImage] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += _folder_images(path)
        elif path.suffix.lower() == ".csv":
            found += _manifest_images(path, allow_links_outside)
        elif path.is_file():
            found.append(InputImage(str(path), path))
        elif path.exists():
            raise DataError(f"{path}: not a regular file (a FIFO, device or socket); expected an image, a folder or a manifest")
        else:
            raise DataError(f"{path}: file or folder not found")
    if not found:
        raise DataError("no input images given")
    return found


def _as_input(item: str | os.PathLike | np.ndarray | InputImage, position: int) -> InputImage:
    if isinstance(item, InputImage):
        return item
    if isinstance(item, np.ndarray):
        return InputImage(f"array[{position}]", pixels=item)
    return InputImage(str(item), Path(item))


def load_pixels(image: InputImage) -> np.ndarray:
    """The ``[0, 1]`` H×W image of an input (read from its file unless given in memory)."""
    if image.pixels is not None:
        return image.pixels
    assert image.path is not None
    return read_image(image.path).pixels


def prepare(images: Sequence[InputImage], spec: PreprocessSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """Model input batch (N×C×S×S float32) and the ``[0, 1]`` originals of ``images``.

    Raises:
        DataError: an unreadable file (named), or an array that is not a ``[0, 1]`` image.
    """
    originals, batch = [], []
    for image in images:
        pixels = load_pixels(image)
        try:
            batch.append(preprocess(pixels, spec))
        except ValueError as exc:
            raise DataError(f"{image.name}: {exc}") from None
        originals.append(pixels)
    return np.stack(batch), originals


# -- the model ----------------------------------------------------------------------------------
@dataclass
class RuntimePredictions:
    """What an exported model (onnxruntime) says about images ``names`` (in input order): numpy
    probabilities, decisions at the model's saved threshold and Grad-CAMs. (The torch model's
    outputs over a dataset during training are :class:`cxrdebias.training.inference.Predictions`.)

    ``probabilities``: N×K (columns = ``labels``); ``cams``: N×S×S Grad-CAM of the positive
    class in ``[0, 1]``, in model-input geometry (``geometries[i]`` maps it onto image ``i``,
    see :func:`cxrdebias.deploy.overlay.cam_to_image`). ``images`` holds the ``[0, 1]`` originals
    only while streaming (:meth:`CXRModel.iter_predict`). ``ood_score`` (N float),
    ``in_distribution`` (N bool: ``ood_score <= ood_threshold``) and ``ood_threshold``: the
    out-of-distribution score, its verdict and threshold, ``None`` for a model without them
    (exported before the guard).
    """

    names: list[str]
    probabilities: np.ndarray
    cams: np.ndarray
    labels: tuple[str, ...]
    positive_index: int
    threshold: float
    provider: str
    geometries: list[ResizeGeometry]
    fields: list[dict[str, str]]
    images: list[np.ndarray] | None = None
    ood_score: np.ndarray | None = None
    in_distribution: np.ndarray | None = None
    ood_threshold: float | None = None

    @property
    def positive_probability(self) -> np.ndarray:
        return self.probabilities[:, self.positive_index]

    @property
    def predicted_positive(self) -> np.ndarray:
        """``positive_probability >= threshold`` (bool, N)."""
        return self.positive_probability >= self.threshold

    @property
    def predicted_labels(self) -> list[str]:
        negative = self.labels[1 - self.positive_index]
        return [self.labels[self.positive_index] if p else negative for p in self.predicted_positive]

    @classmethod
    def concat(cls, parts: Sequence[RuntimePredictions]) -> RuntimePredictions:
        """One :class:`RuntimePredictions` from consecutive batches (the originals are dropped)."""
        first = parts[0]
        return cls(
            names=[n for p in parts for n in p.names],
            probabilities=np.concatenate([p.probabilities for p in parts]),
            cams=np.concatenate([p.cams for p in parts]),
            labels=first.labels,
            positive_index=first.positive_index,
            threshold=first.threshold,
            provider=first.provider,
            geometries=[g for p in parts for g in p.geometries],
            fields=[f for p in parts for f in p.fields],
            ood_score=_joined([p.ood_score for p in parts]),
            in_distribution=_joined([p.in_distribution for p in parts]),
            ood_threshold=first.ood_threshold,
        )


def _joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
    """The arrays of consecutive batches concatenated; ``None`` when a batch has none."""
    return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]


def _providers(device: str) -> list[str]:
    if device not in DEVICES:
        raise ConfigError(f"device {device!r}; expected one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ConfigError(
            "device 'cuda' needs onnxruntime-gpu (`make install-gpu`); installed providers: " + ", ".join(available)
        )
    if device != "cpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class CXRModel:
    """An exported cxrdebias model in an onnxruntime session (see :func:`load_model`)."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata, source: str):
        self.session = session
        self.metadata = metadata
        self.source = source
        self.has_ood = [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)

    @property
    def provider(self) -> str:
        """The execution provider onnxruntime actually uses (the first of the session's)."""
        return self.session.get_providers()[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N×K) and CAMs (N×S×S) of a preprocessed batch (N×C×S×S float32)."""
        probs, cams, _ = self.run_all(batch)
        return probs, cams

    def run_all(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Probabilities (N×K), CAMs (N×S×S) and OOD scores (N; ``None`` for a model without
        them) of a preprocessed batch (N×C×S×S float32)."""
        expected = self.metadata.preprocessing.output_shape
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise DataError(f"model input must be N×{'×'.join(map(str, expected))}, got {batch.shape}")
        names = list(OUTPUT_NAMES if self.has_ood else LEGACY_OUTPUT_NAMES)
        try:
            probs, cams, *ood = self.session.run(names, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        except Exception as exc:  # onnxruntime's pybind error types: a graph that does not fit its metadata
            text = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{self.source}: the model failed on its own preprocessed input ({type(exc).__name__}: {text})") from None
        n, size = batch.shape[0], expected[-1]
        if np.shape(probs) != (n, len(self.metadata.labels)) or np.shape(cams) != (n, size, size):
            raise CheckpointError(
                f"{self.source}: the model returned probabilities {np.shape(probs)} and CAMs {np.shape(cams)}; "
                f"its metadata promise {n}×{len(self.metadata.labels)} and {n}×{size}×{size}"
            )
        if ood and np.shape(ood[0]) != (n,):
            raise CheckpointError(f"{self.source}: the model returned OOD scores {np.shape(ood[0])}; expected one per image ({n})")
        return probs, cams, (ood[0] if ood else None)

    def iter_predict(
        self, images: Iterable[str | os.PathLike | np.ndarray | InputImage], batch_size: int = 16
    ) -> Iterator[RuntimePredictions]:
        """:class:`RuntimePredictions` of consecutive batches of ``images``, with their originals."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        items = [_as_input(x, i) for i, x in enumerate(images)]
        spec, meta = self.metadata.preprocessing, self.metadata
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch, originals = prepare(chunk, spec)
            probs, cams, ood = self.run_all(batch)
            yield RuntimePredictions(
                names=[x.name for x in chunk],
                probabilities=probs,
                cams=cams,
                labels=meta.labels,
                positive_index=meta.positive_index,
                threshold=meta.threshold,
                provider=self.provider,
                geometries=[resize_geometry(p.shape, spec) for p in originals],
                fields=[x.fields for x in chunk],
                images=originals,
                ood_score=ood,
                in_distribution=None if ood is None or meta.ood_threshold is None else ood <= meta.ood_threshold,
                ood_threshold=meta.ood_threshold,
            )

    def predict(
        self, images: Iterable[str | os.PathLike | np.ndarray | InputImage], batch_size: int = 16
    ) -> RuntimePredictions:
        """Probabilities, labels at the saved threshold and CAMs of image files or ``[0, 1]`` arrays."""
        parts = list(self.iter_predict(images, batch_size))
        if not parts:
            raise DataError("no input images given")
        return RuntimePredictions.concat(parts)


def load_model(model: str | os.PathLike | bytes, *, device: str = "auto") -> CXRModel:
    """Open an exported model (file path or the ONNX bytes) for inference.

    ``device``: ``auto`` (CUDA when onnxruntime-gpu and a GPU are present, else CPU), ``cpu``
    or ``cuda``. :attr:`CXRModel.provider` says which one onnxruntime uses.

    Raises:
        CheckpointError: missing, corrupted or non-ONNX file; an ONNX model without cxrdebias
            metadata or whose inputs/outputs are not the exported ones.
        ConfigError: ``device`` unknown, or ``cuda`` without onnxruntime-gpu.
    """
    source = "<bytes>" if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise CheckpointError(f"{source}: model file not found")
    providers = _providers(device)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a missing GPU is reported through .provider
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind types for invalid files
        text = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{source}: not a readable ONNX model ({type(exc).__name__}: {text})") from None
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map, source)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs not in (list(OUTPUT_NAMES), list(LEGACY_OUTPUT_NAMES)):
        raise CheckpointError(
            f"{source}: graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
            f"{list(OUTPUT_NAMES)} (or {list(LEGACY_OUTPUT_NAMES)} before the OOD guard)"
        )
    if outputs == list(OUTPUT_NAMES) and metadata.ood_threshold is None:
        raise CheckpointError(f"{source}: the graph has an {OOD_SCORE!r} output but its metadata give no 'ood_threshold'")
    _check_graph_shapes(session, metadata, source)
    return CXRModel(session, metadata, source)


def _check_graph_shapes(session: ort.InferenceSession, metadata: ModelMetadata, source: str) -> None:
    """The graph's fixed input/output sizes agree with the metadata (image size, channels,
    classes): a model whose metadata were edited or belong to another graph is refused here,
    not with an onnxruntime error at the first image."""
    c, s, _ = metadata.preprocessing.output_shape
    promised = {
        INPUT_NAME: ("N", c, s, s),
        PROBABILITIES: ("N", len(metadata.labels)),
        CAM: ("N", s, s),
        OOD_SCORE: ("N",),
    }
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        want, got = promised[arg.name], list(arg.shape)
        if len(got) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(got[1:], want[1:], strict=True)):
            shown = "×".join("?" if not isinstance(g, int) else str(g) for g in got)
            raise CheckpointError(
                f"{source}: the graph's {arg.name!r} is {shown} but its metadata (preprocessing {c} channel(s) of "
                f"{s}×{s} px, {len(metadata.labels)} labels) promise {'×'.join(map(str, want))}; "
                "the metadata do not belong to this graph"
            )
