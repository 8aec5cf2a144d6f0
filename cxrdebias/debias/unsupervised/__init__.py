r"""Unsupervised online bias discovery: pseudo-bias labels from the model's own bottleneck.

Most deployments do not know their bias. The observation this module builds on: in a vanilla
model's bottleneck, each class centroid carries the dominant bias of that class, and the
bias-*conflicting* samples (a red "3" when red means "0") sit near the centroid of the class
whose bias they share — the centroids are *attractors*. Early in training, while the model
relies on the shortcut, "which class is this sample attracted to" is a proxy for its bias
label; so are the clusters within a class.

A :class:`PseudoBiasLabeller` turns the features and logits of the batch the model has just
computed (no extra pass over the data, no second training run) into pseudo-bias labels:

``attractor``
    running cosine centroids per class (EMA with ``momentum``); the label of a sample is the
    index of the nearest class centroid, ``argmax_c cos(ỹ, μ_c)``. Labels live in the class
    space: a sample with ``label ≠ target`` is *likely conflicting*.
``cluster``
    per-class spherical k-means on a bounded memory bank of recent bottleneck features,
    re-run every ``refresh_every`` steps (warm-started from the previous centres); ``k``
    given, or ``"auto"``: the ``k ∈ {2…k_max}`` with the best cosine silhouette, or 1 when no
    ``k`` reaches ``min_silhouette``. Label ``= class·k + cluster`` (``k = k_max`` as the
    stride when automatic); likely conflicting = not in the largest cluster of its class.
``gce_head``
    a linear head on the *detached* bottleneck trained with the generalised cross-entropy
    (``q = 0.7``, :func:`~cxrdebias.debias.lff.generalized_cross_entropy`, LfF eq. 1), which
    amplifies the easiest cue — the bias; its arg-max is the label (class space).
``errors``
    JTT/LfF-style, online: a per-sample EMA (indexed by ``batch["index"]``) of the early
    model's one-hot predictions during the warm-up (the shortcut phase), frozen at its end;
    label = target where the EMA of "correct" is ≥ ``easy_threshold`` (bias-aligned), else the
    other class most voted for (likely conflicting). Class space, like ``attractor``; made for
    local cues, which pooled features may not separate.

The tapped layer (``layer``) is pooled over space by ``layer_pool`` (mean or max), over a
``layer_grid × layer_grid`` grid of regions so that *where* a local cue is survives the pooling.

Common options (:class:`PseudoBiasOptions`): ``warmup_steps`` (before it, with
``warmup_labels: none``, the wrapped method gets no bias labels and takes a plain cross-entropy
step — EnD's terms are 0; with ``warmup_labels: target`` it already runs, with pseudo-bias =
target, i.e. every sample assumed bias-aligned), ``refresh_every``
(period of the snapshot the labels are computed from: centroids, clusters, head weights),
``source`` (``live``: statistics keep following the model; ``frozen``: statistics stop at the
end of warm-up, when the model still relies on the shortcut; ``ema``: per-sample EMA of the soft
assignment, the label is its arg-max — temporal ensembling indexed by ``batch["index"]``) and
``reweight`` (the cross-entropy weight of likely-conflicting samples; 1 = off).

:class:`UnsupervisedBias` wraps any method that uses bias labels: one whose step is one forward
pass + ``compute_loss`` (``end``, ``groupdro``; also ``vanilla`` — then the labeller only
observes, or re-weights), or one with its own update that takes its bias labels through
:meth:`~cxrdebias.debias.base.Method.with_bias` after its first forward pass (``lnl``,
``blindeye``; the wrapper supplies them through
:meth:`~cxrdebias.debias.base.Method.set_bias_source`). Methods that never use bias labels
(``lff``, ``rebias``) are refused. It replaces ``batch["bias"]`` by the pseudo labels before
the wrapped method sees them; the dataset's true bias labels (when it has them) are used for
the agreement metrics only (:func:`label_agreement`, logged per epoch under ``pseudo_bias``),
never by the method. Everything (running statistics, memory bank, head, its optimiser,
per-sample EMAs, the step counter) is in ``state_dict``/``extra_state``, so checkpoints and
resume keep it.

Modules: :mod:`~cxrdebias.debias.unsupervised.options` (:class:`PseudoBiasOptions`, free of
torch: the config imports it), :mod:`~cxrdebias.debias.unsupervised.labellers`,
:mod:`~cxrdebias.debias.unsupervised.taps` (:class:`FeatureTap`),
:mod:`~cxrdebias.debias.unsupervised.agreement` (:func:`label_agreement`),
:mod:`~cxrdebias.debias.unsupervised.group_maps` (where groups differ: the ε² map of an early
layer, its mass inside boxes; read by ``cxrdebias analyze-bias``) and
:mod:`~cxrdebias.debias.unsupervised.wrapper` (:class:`UnsupervisedBias`).
"""

from __future__ import annotations

from cxrdebias.debias.unsupervised.agreement import label_agreement
from cxrdebias.debias.unsupervised.group_maps import (
    GroupMoments,
    box_coverage,
    collect_group_moments,
    epsilon_squared,
    map_mass_in_box,
    map_mass_in_region,
    mass_by_region,
    union_coverage,
)
from cxrdebias.debias.unsupervised.labellers import (
    LABELLER_CLASSES,
    AttractorLabeller,
    ClusterLabeller,
    ErrorsLabeller,
    GCEHeadLabeller,
    PseudoBiasLabeller,
    build_labeller,
    cosine_silhouette,
    spherical_kmeans,
)
from cxrdebias.debias.unsupervised.options import LABELLERS, SOURCES, PseudoBiasOptions
from cxrdebias.debias.unsupervised.taps import FeatureTap, resolve_layer
from cxrdebias.debias.unsupervised.wrapper import UnsupervisedBias, check_wrappable

__all__ = [
    "LABELLERS",
    "LABELLER_CLASSES",
    "SOURCES",
    "AttractorLabeller",
    "ClusterLabeller",
    "ErrorsLabeller",
    "FeatureTap",
    "GCEHeadLabeller",
    "GroupMoments",
    "PseudoBiasLabeller",
    "PseudoBiasOptions",
    "UnsupervisedBias",
    "box_coverage",
    "build_labeller",
    "check_wrappable",
    "collect_group_moments",
    "cosine_silhouette",
    "epsilon_squared",
    "label_agreement",
    "map_mass_in_box",
    "map_mass_in_region",
    "mass_by_region",
    "resolve_layer",
    "spherical_kmeans",
    "union_coverage",
]
