"""Patient-level train/val/test splits of a loaded manifest, and the split table a run saves.

Every image of a patient lands in one split (:func:`make_splits`); the protocols are ``corda``
(30% of each site's patients as test, stratified by site and label), ``random`` (the same with
another test fraction) and ``manifest`` (the manifest's own ``split`` column). A run saves the
assignment (:func:`save_splits`) so that evaluation and export re-use it (:func:`load_splits`).
Column names come from :data:`~cxrdebias.data.cxr.manifest.MANIFEST`. No torch import.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cxrdebias.data.csv_records import read_csv_records
from cxrdebias.data.cxr.manifest import MANIFEST, MAX_LISTED_PROBLEMS
from cxrdebias.errors import ConfigError, DataError
from cxrdebias.fileio import write_text_atomic

#: share of each site's patients held out as test in the CORDA protocol
CORDA_TEST_FRACTION = 0.3
#: default test share of the ``"random"`` protocol
RANDOM_TEST_FRACTION = 0.2

SplitProtocol = Literal["corda", "random", "manifest"]


def _stable_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (not on Python's hash seed)."""
    digest = hashlib.sha256("\x1f".join(keys).encode()).digest()
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


def _patients(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: its site (most frequent; ties → first by name) and majority label
    (ties → 1), i.e. its stratum."""
    counts = df.groupby([MANIFEST.patient_id, MANIFEST.site]).size().reset_index(name="n")
    counts = counts.sort_values([MANIFEST.patient_id, "n", MANIFEST.site], ascending=[True, False, True])
    site = counts.drop_duplicates(MANIFEST.patient_id).set_index(MANIFEST.patient_id)[MANIFEST.site]
    pos = df.groupby(MANIFEST.patient_id)[MANIFEST.label].agg(["sum", "size"])
    label = (2 * pos["sum"] >= pos["size"]).astype("int64")
    return pd.DataFrame({MANIFEST.site: site, MANIFEST.label: label}).sort_index()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_splits(
    df: pd.DataFrame,
    protocol: SplitProtocol = "corda",
    val_fraction: float = 0.2,
    test_fraction: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A copy of ``df`` with a ``split`` column (``train``/``val``/``test``), by patient.

    Every image of a patient is in one split. ``corda`` and ``random`` stratify patients by
    (site, majority label): in each stratum ``round(n · test_fraction)`` patients go to test,
    then ``round(rest · val_fraction)`` to validation, the rest to training. Each site then gets
    at least one patient in every split with a non-zero fraction (moved from its training
    patients); a site too small for that is a :class:`DataError`. ``corda`` is the CORDA
    protocol: 30% of each site's patients held out as test. ``manifest`` uses the manifest's own
    ``split`` column (every row set, no patient in two splits). Under ``corda`` and ``random`` a
    site whose rows are all marked ``test`` in the manifest's ``split`` column (an *external*
    site, :func:`test_only_sites`) stays test only. The assignment depends only on
    ``seed`` and the table's content (not on row order or Python's hash seed).

    Raises:
        ConfigError: unknown protocol or fractions out of range.
        DataError: a site has too few patients, or the manifest's split column is unusable.
    """
    if protocol == "manifest":
        return _manifest_splits(df)
    if protocol == "corda":
        if test_fraction is not None and not math.isclose(test_fraction, CORDA_TEST_FRACTION):
            raise ConfigError(
                f"test_fraction={test_fraction}: the corda protocol holds out {CORDA_TEST_FRACTION:.0%} of each "
                "site's patients; use split_protocol 'random' for another test fraction"
            )
        test_fraction = CORDA_TEST_FRACTION
    elif protocol == "random":
        test_fraction = RANDOM_TEST_FRACTION if test_fraction is None else test_fraction
    else:
        raise ConfigError(f"split protocol {protocol!r}: expected 'corda', 'random' or 'manifest'")
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction}, val_fraction={val_fraction}: each must be in [0, 1)")
    if df.empty:
        raise DataError("cannot split an empty manifest")

    patients = _patients(df)
    assignment: dict[str, str] = {}
    wanted = [s for s, f in (("test", test_fraction), ("val", val_fraction)) if f > 0]
    external = test_only_sites(df)
    for site, site_patients in patients.groupby(MANIFEST.site, sort=True):
        if site in external:  # never trained on: every patient is test
            assignment.update(dict.fromkeys(site_patients.index, "test"))
            continue
        split_of: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        strata = []
        for label, group in site_patients.groupby(MANIFEST.label, sort=True):
            ids = sorted(group.index)
            order = _stable_rng(seed, str(site), str(label)).permutation(len(ids))
            ids = [ids[i] for i in order]
            n_test = _round_half_up(len(ids) * test_fraction)
            n_val = _round_half_up((len(ids) - n_test) * val_fraction)
            strata.append({"test": ids[:n_test], "val": ids[n_test : n_test + n_val], "train": ids[n_test + n_val :]})
        needed = 1 + len(wanted)
        if len(site_patients) < needed:
            raise DataError(
                f"site {site!r} has {len(site_patients)} patient(s); a patient-level "
                f"{'/'.join(['train', *reversed(wanted)])} split needs at least {needed} per site"
            )
        for split in wanted:  # every site in every split: move one training patient if needed
            if not any(s[split] for s in strata):
                donor = max(strata, key=lambda s: len(s["train"]))
                donor[split].append(donor["train"].pop())
        if not any(s["train"] for s in strata):  # cannot happen with n ≥ needed, kept as a guard
            donor = max(strata, key=lambda s: len(s["val"]) + len(s["test"]))
            donor["train"].append((donor["val"] or donor["test"]).pop())
        for s in strata:
            for split, ids in s.items():
                split_of[split].extend(ids)
        for split, ids in split_of.items():
            assignment.update(dict.fromkeys(ids, split))
    out = df.copy()
    out[MANIFEST.split] = out[MANIFEST.patient_id].map(assignment).astype(object)
    return out


def test_only_sites(df: pd.DataFrame) -> set[str]:
    """Sites whose rows are all marked ``test`` in the manifest's ``split`` column (external
    sites, e.g. of ``data synth --external-sites``); none without that column, or when every
    site would be test only (nothing left to train on)."""
    if MANIFEST.split not in df.columns or df.empty:
        return set()
    is_test = df[MANIFEST.split].astype(str).str.strip().str.lower() == "test"
    only = is_test.groupby(df[MANIFEST.site]).all()
    sites = {str(s) for s in only.index[only.to_numpy()]}
    return set() if len(sites) == len(only) else sites


def _manifest_splits(df: pd.DataFrame) -> pd.DataFrame:
    if MANIFEST.split not in df.columns:
        raise DataError("split protocol 'manifest' needs a 'split' column (train/val/test) in the manifest")
    rows = df["row"] if "row" in df.columns else pd.Series(range(len(df)), index=df.index)
    bad = df[MANIFEST.split].isna() | ~df[MANIFEST.split].isin(MANIFEST.splits)
    if bad.any():
        listed = ", ".join(str(r) for r in rows[bad].head(MAX_LISTED_PROBLEMS))
        raise DataError(
            f"split protocol 'manifest': {int(bad.sum())} row(s) without a train/val/test split (rows {listed})"
        )
    per_patient = df.groupby(MANIFEST.patient_id)[MANIFEST.split].nunique()
    leaky = sorted(per_patient[per_patient > 1].index)
    if leaky:
        pid = leaky[0]
        mine = df[MANIFEST.patient_id] == pid
        where = ", ".join(f"row {r}: {s}" for r, s in zip(rows[mine], df.loc[mine, MANIFEST.split], strict=True))
        raise DataError(
            f"split protocol 'manifest': {len(leaky)} patient(s) in more than one split, e.g. {pid!r} ({where}); "
            "a patient's images must share one split"
        )
    return df.copy()


def split_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per (split, site, label) — to print and to save with a run."""
    g = df.groupby([MANIFEST.split, MANIFEST.site, MANIFEST.label])
    return pd.DataFrame({"images": g.size(), "patients": g[MANIFEST.patient_id].nunique()}).reset_index()


def site_table_markdown(df: pd.DataFrame) -> str:
    """Per site: patients, images, negative and positive images, as a Markdown table (``data check``)."""
    lines = ["| site | patients | images | negative | positive |", "|---|---:|---:|---:|---:|"]
    for site, g in df.groupby(MANIFEST.site):
        n_pos = int((g[MANIFEST.label] == 1).sum())
        lines.append(f"| {site} | {g[MANIFEST.patient_id].nunique()} | {len(g)} | {len(g) - n_pos} | {n_pos} |")
    return "\n".join(lines)


def save_splits(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the split table (``path, patient_id, site, label, split``) as CSV, atomically."""
    missing = [c for c in MANIFEST.split_table if c not in df.columns]
    if missing:
        raise ValueError(f"save_splits: table lacks column(s) {missing}; call make_splits first")
    buf = io.StringIO()
    df.loc[:, list(MANIFEST.split_table)].to_csv(buf, index=False, lineterminator="\n")
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    return path


def load_splits(path: str | os.PathLike, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Read a split table written by :func:`save_splits`.

    Without ``df``: the table itself. With ``df`` (a loaded manifest): a copy of ``df`` with the
    saved ``split`` column, after checking that both list exactly the same image paths with the
    same patient, site and label (so an evaluation uses the training run's split).

    Raises:
        DataError: unreadable table, bad split values, or a table that does not match ``df``.
    """
    path = Path(path)
    header, records = read_csv_records(path, columns=MANIFEST.split_table, what="split table")
    for line, fields in records:
        if len(fields) != len(header):
            raise DataError(f"{path}: row {line} has {len(fields)} fields, the header has {len(header)}")
    table = pd.DataFrame([fields for _, fields in records], columns=header, dtype=object)
    bad = ~table[MANIFEST.split].isin(MANIFEST.splits)
    if bad.any():
        line = records[int(np.flatnonzero(bad.to_numpy())[0])][0]
        raise DataError(f"{path}: row {line} split {table[MANIFEST.split][bad].iloc[0]!r}; expected train, val or test")
    if df is None:
        return table
    saved = table.set_index(MANIFEST.path)
    if saved.index.has_duplicates:
        raise DataError(f"{path}: split table lists an image twice ({saved.index[saved.index.duplicated()][0]!r})")
    current = set(df[MANIFEST.path])
    extra, absent = sorted(set(saved.index) - current), sorted(current - set(saved.index))
    if extra or absent:
        raise DataError(
            f"{path}: split table does not match the manifest ({len(absent)} manifest image(s) not in it, e.g. "
            f"{absent[:1]}; {len(extra)} listed image(s) not in the manifest, e.g. {extra[:1]})"
        )
    aligned = saved.loc[df[MANIFEST.path]]
    for col in (MANIFEST.patient_id, MANIFEST.site, MANIFEST.label):
        mismatch = aligned[col].astype(str).to_numpy() != df[col].astype(str).to_numpy()
        if mismatch.any():
            i = int(np.flatnonzero(mismatch)[0])
            raise DataError(
                f"{path}: image {df[MANIFEST.path].iloc[i]!r} has {col} {aligned[col].iloc[i]!r} in the split table "
                f"but {df[col].iloc[i]!r} in the manifest"
            )
    out = df.copy()
    out[MANIFEST.split] = aligned[MANIFEST.split].to_numpy()
    return out


