"""Synthetic multi-site chest X-rays: the embedded, fully offline default data set.

Why it exists
-------------
The chest X-ray application (COVID-19 detection with the *acquisition site* as the bias, as in
the CORDA study) needs data that cannot ship with the package. This package writes a small,
deterministic stand-in with the same structure — DICOM files from several "hospitals", a
``manifest.csv`` and a patient-level train/val/test split — so that every command of the package
runs end to end without downloads.

Generative model
----------------
Every image is drawn in four stages, all vectorised numpy on a ``N×N`` grid of normalised
coordinates ``u`` (left→right) and ``v`` (top→bottom), both in ``[-1, 1]``:

1. **Patient anatomy** (one random draw per patient, shared by all of the patient's images): a
   soft-tissue body outline, two tapered lung fields with a flat medial and a convex lateral
   border, diaphragm domes (the right one higher), a left-leaning heart, the mediastinum with
   trachea, aortic knob and spine, posterior and anterior ribs (curved bands with cortical
   edges), clavicles, vessel markings radiating from the hila and, for female patients, faint
   breast shadows. A smooth random displacement field deforms the whole thorax, so no two
   patients are alike. Each structure adds to (bone, soft tissue) or removes from (air in the
   lungs and trachea) an *attenuation* map ``A``; the detector image is ``1 - exp(-μ·A)``.
2. **Acquisition of one image**: follow-up images of a patient (1–3 by default) change the pose
   (rotation, shift, scale), the depth of inspiration, the exposure ``μ`` and, for AP views,
   the magnification of the heart.
3. **Disease** (label 1 = COVID-19 positive): ground-glass opacities — soft, hazy increases of
   ``A`` inside both lungs, weighted towards the periphery (near the lateral pleura) and the
   lower zones, with patchy random shape and an extent drawn per patient from
   :attr:`SynthConfig.severity_range` (subtle to extensive). Negative images have none. A few
   patients of *either* class get a non-COVID finding (nodule, cardiomegaly, perihilar haze)
   so that "any abnormality" is not the same as "COVID".
4. **Site signature** (one per hospital, :class:`SiteStyle`, drawn by :mod:`.signature`): contrast curve (sigmoid LUT and
   gamma), global brightness, edge enhancement (unsharp masking), noise level and grain, a
   collimation frame of site-specific width and colour, a burned-in lead marker ("L"/"R") and a
   text label in site-specific corners, the share of AP (bedside) views, and the DICOM
   encoding (bit depth, MONOCHROME1/2, rescale slope/intercept, window).

Optionally (:attr:`SynthConfig.cue`, off by default) a **local cue** correlated with the *label*
— a burned-in tag, text or lead marker, or ECG electrodes or a tube — is drawn into a share of
each label's images (:mod:`.cues`): devices into the attenuation after stage 3, burned-in
annotations onto the display image after stage 4.

Why a vanilla model takes the shortcut
--------------------------------------
The site signature is *global and deterministic*: a frame, text and grey-level curve present in
every image of a site, visible at any resolution. The disease is *local, patchy and of variable
extent* — sometimes subtle — and sits on top of anatomy that varies from patient to patient.
In the train/val pool the label is correlated with the site like in CORDA (by default
``hospital_a`` is ~88 % positive and ``hospital_b`` ~12 %), so predicting the site already gives
~88 % training accuracy with far less effort than reading the lungs. The test split is balanced
(50 % positive) within every site, so a shortcut model fails on the bias-conflicting groups
(positives of the mostly-negative site, negatives of the mostly-positive site) and a debiased
model (e.g. EnD with the site as bias label) should not. :attr:`SynthConfig.bias_strength`
moves the per-site prevalences towards their mean (0 = no site–label correlation) and
:attr:`SynthConfig.site_style_strength` fades the site signature out (0 = sites look alike).

Outputs of :func:`synthesize` (in ``out_dir``)
--------------------------------------------
- ``images/<site>/<patient_id>_<k>.dcm`` — one Computed Radiography DICOM per image,
- ``manifest.csv`` — ``path,label,site,patient_id,view,sex,age,split`` (``path`` relative to the
  manifest; every image of a patient shares its site, label and split),
- ``synth_config.json`` — the generator config, seed, generator version, resolved site styles,
  counts and SHA-256 hashes of the manifest and of the pixel data,
- ``cues.csv`` — only with a cue: ``path,cue,kind,x0,y0,x1,y1`` per image (cue 0/1 and its box
  in native pixels, ``x1``/``y1`` exclusive; the manifest keeps its columns).

Everything is a function of ``(config, seed, GENERATOR_VERSION)``: the same inputs give
byte-identical files. The package does not import torch.

Modules: :mod:`.config` (options, summary, file names), :mod:`.styles` (site styles), :mod:`.cues`
(local cues),
:mod:`.numeric` (float32 helpers), :mod:`.anatomy` (stages 1–3), :mod:`.signature` (stage 4),
:mod:`.dicom` (encoding and writing one image), :mod:`.writer` (study design,
:func:`synthesize`, :func:`preview`).
"""

from cxrdebias.data.synthetic.config import (
    GENERATOR_VERSION,
    SplitSiteCount,
    SynthConfig,
    SynthSummary,
)
from cxrdebias.data.synthetic.styles import SiteStyle, site_style
from cxrdebias.data.synthetic.writer import preview, synthesize

__all__ = [
    "GENERATOR_VERSION",
    "SiteStyle",
    "SplitSiteCount",
    "SynthConfig",
    "SynthSummary",
    "preview",
    "site_style",
    "synthesize",
]
