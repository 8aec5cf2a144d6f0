"""The CXR manifest contract: validation with row numbers, patient-level splits, the dataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrdebias.data.base import TensorBatchLoader
from cxrdebias.data.cxr import (
    CXRDataConfig,
    CXRDataset,
    build_cxr,
    collate,
    format_drop_summary,
    load_manifest,
    load_splits,
    make_splits,
    manifest_hash,
    save_splits,
    site_index_map,
)
from cxrdebias.data.cxr.manifest import MANIFEST, read_manifest_images
from cxrdebias.data.images import read_image, write_dicom
from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.errors import ConfigError, DataError

HEADER = "path,label,site,patient_id"


def png(path: Path, seed: int) -> Path:
    """A tiny PNG whose pixels are unique to ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    return path


def write_manifest(folder: Path, lines: list[str], header: str = HEADER) -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def small_set(folder: Path, sites=("A", "B"), patients_per_site: int = 6) -> Path:
    """Sites × patients, one image each, labels alternating so every site has both classes."""
    lines = []
    for s, site in enumerate(sites):
        for p in range(patients_per_site):
            rel = f"img/{site}/{p}.png"
            png(folder / rel, seed=100 * s + p)
            lines.append(f"{rel},{p % 2},{site},{site}-{p}")
    return write_manifest(folder, lines)


@pytest.fixture(scope="module")
def real_manifest(cxr_manifest) -> Path:
    """The real two-source manifest (conftest's ``cxr_manifest``: skips when it is absent)."""
    return cxr_manifest


@pytest.fixture(scope="module")
def real_df(real_manifest) -> pd.DataFrame:
    return load_manifest(real_manifest)


# -- loading a valid manifest ---------------------------------------------------------------------------
def test_valid_manifest_columns_and_rows(tmp_path):
    path = small_set(tmp_path)
    df = load_manifest(path)
    assert len(df) == 12 and df["row"].tolist() == list(range(2, 14))
    assert df["label"].dtype == np.int64 and set(df["label"]) == {0, 1}
    assert df.loc[0, "path"] == "img/A/0.png" and Path(df.loc[0, "abs_path"]) == tmp_path / "img/A/0.png"
    assert df["image_format"].eq("PNG").all() and df["image_sha256"].nunique() == 12
    assert df.attrs["dropped"] == [] and df.attrs["manifest"]["records"] == 12
    assert len(df.attrs["manifest"]["sha256"]) == 64
    assert manifest_hash(df) == manifest_hash(load_manifest(path))


def test_schema_names_the_columns_every_table_uses(tmp_path):
    assert MANIFEST.required == ("path", "label", "site", "patient_id") == tuple(HEADER.split(","))
    assert MANIFEST.columns == (*MANIFEST.required, "view", "sex", "age", "split")
    assert MANIFEST.required_for(site_from_dicom=True) == ("path", "label", "patient_id")
    df = load_manifest(small_set(tmp_path))
    assert tuple(df.columns) == ("row", *MANIFEST.required[:1], "abs_path", *MANIFEST.required[1:], "image_sha256", "image_format")
    assert set(MANIFEST.added) >= set(df.columns) - set(MANIFEST.columns)
    saved = save_splits(make_splits(df, "random", seed=0), tmp_path / "splits.csv")
    assert tuple(load_splits(saved).columns) == MANIFEST.split_table


def test_manifest_image_list_for_the_runtime(tmp_path):
    """The torch-free reader of ``cxrdebias predict``: paths and site/label/patient, no validation."""
    png(tmp_path / "a.png", 1)
    png(tmp_path / "sub" / "b.png", 2)
    path = write_manifest(tmp_path, ["a.png,x,S1,p1,PA", "sub/b.png,,S2,p2,AP"], header="path,label,site,patient_id,view")
    assert read_manifest_images(path) == [
        (tmp_path / "a.png", {"site": "S1", "label": "x", "patient_id": "p1"}),
        (tmp_path / "sub" / "b.png", {"site": "S2", "label": "", "patient_id": "p2"}),
    ]
    only_paths = write_manifest(tmp_path, ["a.png"], header="path")
    assert read_manifest_images(only_paths) == [(tmp_path / "a.png", {})]
    for header, lines, message in (
        ("name", ["a.png"], "missing column(s) path; the header has name (required: path)"),
        ("path,site", ["a.png"], "row 2 has 1 fields, the header has 2"),
        ("path", ["missing.png"], "row 2 column 'path': file not found: missing.png"),
        ("path", ["../a.png"], "row 2 column 'path': '../a.png' leaves the manifest folder"),
        ("path", [], "manifest has no rows"),
    ):
        bad = write_manifest(tmp_path, lines, header=header)
        with pytest.raises(DataError, match=f"^{re.escape(f'{bad}: {message}')}$"):
            read_manifest_images(bad)


def test_real_manifest_loads_and_images_read(real_df):
    assert len(real_df) == 162
    assert set(real_df["site"]) == {"actualmed", "ieee8023"}
    assert real_df["patient_id"].nunique() == 118 and real_df["row"].iloc[0] == 2
    assert {"finding", "view", "source_file"} <= set(real_df.columns)
    for abs_path in real_df["abs_path"].iloc[[0, 50, 161]]:
        img = read_image(abs_path)
        assert img.pixels.ndim == 2 and 0 <= img.pixels.min() < img.pixels.max() <= 1
        assert img.meta["format"] == "PNG"


# -- every problem with its row ---------------------------------------------------------------------------
def _problem_set(tmp_path: Path) -> Path:
    for i in range(7):
        png(tmp_path / f"a{i}.png", seed=i)
    for i in range(2):
        png(tmp_path / f"b{i}.png", seed=50 + i)
    png(tmp_path / "copy_of_a0.png", seed=0)  # same pixels as a0.png
    (tmp_path / "text.png").write_text("not an image\n")
    lines = [
        "a0.png,0,A,pA0",             # 2 ok
        "missing.png,0,A,pA1",        # 3 missing_file
        "a1.png,2,A,pA2",             # 4 bad_label
        "a2.png,,A,pA3",              # 5 bad_label (empty)
        "a3.png,1,,pA4",              # 6 missing_site
        "a4.png,1,A,",                # 7 missing_patient
        "a0.png,0,A,pA0",             # 8 duplicate_path
        "../outside.png,1,A,pA5",     # 9 path_outside
        "/etc/hostname,1,A,pA6",      # 10 path_outside (absolute)
        "text.png,1,A,pA7",           # 11 unreadable_image
        "copy_of_a0.png,1,A,pZ",      # 12 duplicate_image (another patient)
        "a5.png,1,A",                 # 13 bad_row (3 fields)
        "",                           # 14 blank line: not a record, still counted
        "a6.png,1,A,pA8",             # 15 ok
        "b0.png,0,B,pB0",             # 16 ok
        "b1.png,1,B,pB1",             # 17 ok
    ]
    return write_manifest(tmp_path, lines)


EXPECTED_PROBLEMS = {
    3: ("path", "missing_file"),
    4: ("label", "bad_label"),
    5: ("label", "bad_label"),
    6: ("site", "missing_site"),
    7: ("patient_id", "missing_patient"),
    8: ("path", "duplicate_path"),
    9: ("path", "path_outside"),
    10: ("path", "path_outside"),
    11: ("path", "unreadable_image"),
    12: ("path", "duplicate_image"),
    13: ("-", "bad_row"),
}


def test_each_problem_reported_with_its_row(tmp_path):
    path = _problem_set(tmp_path)
    with pytest.raises(DataError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: 11 problem(s) in 11 of 15 rows: ")
    assert "row 3 path: file not found" in msg and "row 4 label: '2'; expected 0 or 1" in msg
    assert "allow_drop_bad_rows" in msg

    df = load_manifest(path, allow_drop=True)
    got = {p["row"]: (p["column"], p["kind"]) for p in df.attrs["dropped"]}
    assert got == EXPECTED_PROBLEMS
    assert df["row"].tolist() == [2, 15, 16, 17]
    reasons = {p["row"]: p["reason"] for p in df.attrs["dropped"]}
    assert reasons[8] == "'a0.png' is also listed in row 2"
    assert reasons[12] == "same pixels as row 2 (patient 'pA0') under patient 'pZ'"
    assert "leaves the manifest folder" in reasons[9] and "is absolute" in reasons[10]
    assert reasons[11].startswith("text.png: not a PNG, JPEG or DICOM file")
    assert reasons[13] == "3 fields, the header has 4"
    summary = format_drop_summary(df.attrs["dropped"], n_rows=15)
    assert summary.startswith("dropped 11 of 15 manifest rows (") and "bad_label: 2" in summary


def test_single_class_site(tmp_path):
    path = small_set(tmp_path)
    png(tmp_path / "c0.png", seed=900)
    png(tmp_path / "c1.png", seed=901)
    with path.open("a") as f:
        f.write("c0.png,1,C,pC0\nc1.png,1,C,pC1\n")
    with pytest.raises(DataError, match=r"rows 14, 15 label: site 'C' has only label 1 \(2 rows\)"):
        load_manifest(path)
    df = load_manifest(path, allow_drop=True)
    assert set(df["site"]) == {"A", "B"} and len(df) == 12
    assert "single_class_site: 2" in format_drop_summary(df.attrs["dropped"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "manifest not found"),  # no file
        (b"", "empty manifest"),
        (b"path,label,patient\nx.png,0,p\n", r"missing column\(s\) site, patient_id; the header has path, label, patient"),
        (b"path,label,site,patient_id\nx\xe9.png,0,A,p\n", "line 2 is not UTF-8"),  # Latin-1
        (b"path,label,label,site,patient_id\n", "repeats column"),
        (b'path,label,site,patient_id\n"a.png"x,0,A,p\n', "line 2: malformed CSV"),
    ],
    ids=["missing", "empty", "columns", "latin1", "duplicate-column", "quote"],
)
def test_file_level_errors(tmp_path, content, match):
    path = tmp_path / "file.csv"  # no "manifest" in the path: the messages must say it
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_manifest(path)


def test_label_map_and_split_values(tmp_path):
    for i in range(4):
        png(tmp_path / f"{i}.png", seed=i)
    path = write_manifest(
        tmp_path,
        ["0.png,COVID-19,A,p0,train", "1.png,No finding,A,p1,Test", "2.png,covid,A,p2,val", "3.png,No finding,A,p3,holdout"],
        header="path,label,site,patient_id,split",
    )
    with pytest.raises(DataError) as info:
        load_manifest(path, label_map={"COVID-19": 1, "No finding": 0})
    assert "row 4 label: 'covid' is not in the label map" in str(info.value)
    assert "row 5 split: 'holdout'; expected one of train, val, test" in str(info.value)
    df = load_manifest(path, label_map={"COVID-19": 1, "No finding": 0}, allow_drop=True)
    assert df["label"].tolist() == [1, 0] and df["split"].tolist() == ["train", "test"]
    with pytest.raises(ConfigError, match="values must be 0 or 1"):
        load_manifest(path, label_map={"x": 2})


# -- the site from a DICOM tag, on real images ---------------------------------------------------------------
def test_site_read_from_dicom_tag(tmp_path, real_df):
    picked = real_df.groupby(["site", "label"]).head(2)  # 2 images per (site, label)
    lines = []
    for i, r in enumerate(picked.itertuples()):
        pixels = read_image(r.abs_path).pixels
        stored = np.rint(pixels * 255).astype(np.uint8)
        write_dicom(tmp_path / f"dcm/{i}.dcm", stored, institution_name=r.site, patient_id=r.patient_id)
        lines.append(f"dcm/{i}.dcm,{r.label},{r.patient_id}")
    path = write_manifest(tmp_path, lines, header="path,label,patient_id")
    with pytest.raises(DataError, match="missing column"):
        load_manifest(path)  # site_source='column' needs the column
    df = load_manifest(path, site_source="dicom:InstitutionName")
    assert df["site"].tolist() == picked["site"].tolist()
    assert df["image_format"].eq("DICOM").all()
    # the pixels survived the round trip through DICOM (8-bit, min–max of a full-range image)
    back = read_image(df["abs_path"].iloc[0]).pixels
    assert back.shape == read_image(picked["abs_path"].iloc[0]).pixels.shape

    # a DICOM without the tag, and a PNG, cannot give a site
    write_dicom(tmp_path / "dcm/none.dcm", np.zeros((32, 32), np.uint8) + np.arange(32, dtype=np.uint8), patient_id="x")
    png(tmp_path / "p.png", seed=7)
    with path.open("a") as f:
        f.write("dcm/none.dcm,0,x\np.png,1,y\n")
    with pytest.raises(DataError) as info:
        load_manifest(path, site_source="dicom:InstitutionName")
    n = len(lines) + 1
    assert f"row {n + 1} site: DICOM tag InstitutionName is missing or empty" in str(info.value)
    assert f"row {n + 2} site: PNG file has no DICOM tag InstitutionName" in str(info.value)
    with pytest.raises(ConfigError, match="site_source"):
        load_manifest(path, site_source="dicom:Institution")


# -- patient-level splits -----------------------------------------------------------------------------------
def test_corda_split_on_real_set(real_df):
    s = make_splits(real_df, "corda", val_fraction=0.2, seed=0)
    assert set(s["split"]) == {"train", "val", "test"}
    assert s.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits
    for site, g in s.groupby("site"):
        assert set(g["split"]) == {"train", "val", "test"}, site
        per_patient = g.drop_duplicates("patient_id")
        share = (per_patient["split"] == "test").mean()
        assert 0.25 <= share <= 0.35, (site, share)  # ≈ 30% of each site's patients
    # deterministic, independent of row order; another seed gives another split
    again = make_splits(real_df.sample(frac=1.0, random_state=1), "corda", val_fraction=0.2, seed=0)
    assert again.set_index("path")["split"].to_dict() == s.set_index("path")["split"].to_dict()
    other = make_splits(real_df, "corda", val_fraction=0.2, seed=1)
    assert not other["split"].equals(s["split"])


def test_random_protocol_and_fraction_rules(real_df):
    s = make_splits(real_df, "random", val_fraction=0.0, test_fraction=0.5, seed=3)
    assert set(s["split"]) == {"train", "test"}
    pts = s.drop_duplicates("patient_id")
    assert abs((pts["split"] == "test").mean() - 0.5) < 0.05
    with pytest.raises(ConfigError, match="corda protocol holds out 30%"):
        make_splits(real_df, "corda", test_fraction=0.2)
    with pytest.raises(ConfigError, match="expected 'corda', 'random' or 'manifest'"):
        make_splits(real_df, "kfold")


def test_small_site_gets_every_split_or_a_clear_error(tmp_path):
    df = load_manifest(small_set(tmp_path, patients_per_site=3))
    s = make_splits(df, "corda", val_fraction=0.2)
    for _, g in s.groupby("site"):
        assert sorted(g["split"]) == ["test", "train", "val"]
    with pytest.raises(DataError, match="site 'A' has 2 patient"):
        make_splits(df[~df["patient_id"].isin(["A-0"])], "corda", val_fraction=0.2)


def test_patient_with_several_images_stays_together(tmp_path):
    lines = []
    for p in range(8):
        for k in range(3):
            rel = f"{p}_{k}.png"
            png(tmp_path / rel, seed=10 * p + k)
            lines.append(f"{rel},{(p + k) % 2 if p < 4 else p % 2},S,P{p}")
    df = load_manifest(write_manifest(tmp_path, lines))
    for seed in range(5):
        s = make_splits(df, "random", val_fraction=0.25, test_fraction=0.25, seed=seed)
        assert s.groupby("patient_id")["split"].nunique().max() == 1


def test_manifest_protocol(tmp_path):
    lines = []
    for i, (split, pid) in enumerate([("train", "p0"), ("train", "p1"), ("val", "p2"), ("test", "p3")]):
        png(tmp_path / f"{i}.png", seed=i)
        lines.append(f"{i}.png,{i % 2},A,{pid},{split}")
    path = write_manifest(tmp_path, lines, header="path,label,site,patient_id,split")
    s = make_splits(load_manifest(path), "manifest")
    assert s["split"].tolist() == ["train", "train", "val", "test"]
    with path.open("a") as f:
        png(tmp_path / "4.png", seed=4)
        f.write("4.png,1,A,p0,test\n")
    with pytest.raises(DataError, match=r"1 patient\(s\) in more than one split, e.g. 'p0' \(row 2: train, row 6: test\)"):
        make_splits(load_manifest(path), "manifest")
    with pytest.raises(DataError, match="needs a 'split' column"):
        make_splits(load_manifest(small_set(tmp_path / "x")), "manifest")


def test_save_and_load_splits(tmp_path, real_df):
    s = make_splits(real_df, "corda", seed=0)
    file = save_splits(s, tmp_path / "run" / "splits.csv")
    table = load_splits(file)
    assert list(table.columns) == ["path", "patient_id", "site", "label", "split"] and len(table) == 162
    restored = load_splits(file, real_df.sample(frac=1.0, random_state=0))
    assert restored.set_index("path")["split"].to_dict() == s.set_index("path")["split"].to_dict()
    with pytest.raises(DataError, match=r"does not match the manifest \(2 manifest image\(s\) not in it"):
        load_splits(file, pd.concat([real_df, real_df.head(2).assign(path=["new1.png", "new2.png"])]))


# -- the torch dataset ----------------------------------------------------------------------------------------
def test_dataset_sample_contract_and_site_mapping(real_df):
    s = make_splits(real_df, "corda", seed=0)
    mapping = site_index_map(s.loc[s["split"] == "train", "site"])
    assert mapping == {"actualmed": 0, "ieee8023": 1}
    spec = PreprocessSpec(image_size=16)
    ds = CXRDataset(s.head(6), spec, mapping, cache=True)
    sample = ds[2]
    assert set(sample) == {"image", "target", "bias", "index"}
    assert sample["image"].shape == (1, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["target"].dtype == torch.int64 and sample["bias"].dtype == torch.int64
    assert int(sample["index"]) == 2 and int(sample["bias"]) == mapping[ds.table["site"][2]]
    assert int(sample["target"]) == ds.table["label"][2]
    assert -1.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    ds.preload(workers=2)
    assert torch.equal(ds[2]["image"], sample["image"])

    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16) and batch["index"].tolist() == [0, 1, 2, 3]

    samples = ds.to_tensor_samples()
    assert samples.bias_names == ["actualmed", "ieee8023"] and samples.class_names == ["negative", "positive"]
    b = next(iter(TensorBatchLoader(samples, batch_size=6)))
    assert torch.equal(b["image"][2], sample["image"])

    with pytest.raises(DataError, match=r"site\(s\) 'ieee8023' not in the site mapping \('actualmed'\)"):
        CXRDataset(s, spec, {"actualmed": 0}, split="test")


def test_build_cxr_from_config(real_manifest, tmp_path):
    cfg = CXRDataConfig(manifest=str(real_manifest), preprocess=PreprocessSpec(image_size=16), cache=False)
    data = build_cxr(cfg)
    assert len(data.train) + len(data.val) + len(data.test) == 162
    assert data.site_to_index == {"actualmed": 0, "ieee8023": 1} and data.dropped == []
    assert len(data.data_hash()) == 64 and len(data.manifest_sha256) == 64
    save_splits(data.table, tmp_path / "splits.csv")
    again = build_cxr(cfg.model_copy(update={"seed": 5}), splits_file=tmp_path / "splits.csv")
    assert again.data_hash() == data.data_hash()  # the saved split wins over the seed
    with pytest.raises(ValueError, match="site_source"):
        CXRDataConfig(manifest="m.csv", site_source="tag")
    with pytest.raises(ConfigError, match="no manifest"):
        build_cxr(CXRDataConfig())


# -- fuzzing the manifest parser: only DataError may escape ---------------------------------------------------
_cell = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(
    st.text(max_size=300),
    st.lists(st.lists(_cell, min_size=0, max_size=6), max_size=6).map(
        lambda rows: "\n".join([HEADER, *(",".join(r) for r in rows)])
    ),
))
def test_fuzz_manifest_parser_raises_only_data_error(tmp_path, text):
    png(tmp_path / "ok.png", seed=0)
    path = tmp_path / "manifest.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        df = load_manifest(path, allow_drop=False)
    except DataError:
        return
    assert len(df) >= 1 and set(df["label"]) <= {0, 1}


def test_every_csv_reader_names_the_missing_required_column_the_same_way(tmp_path):
    """One check in read_csv_records: a split table, a manifest and a cues file word it alike."""
    from cxrdebias.data.csv_records import read_csv_records
    from cxrdebias.data.cxr.splits import load_splits

    table = tmp_path / "splits.csv"
    table.write_text("path,patient_id,site,label\na.png,p,s,0\n")
    with pytest.raises(DataError, match=r"splits.csv: missing column\(s\) split; the header has path, patient_id, site, label"):
        load_splits(table)
    with pytest.raises(DataError, match=r"missing column\(s\) b, c; the header has a \(required: a, b, c\)"):
        read_csv_records(_write(tmp_path / "x.csv", "a\n1\n"), columns=("a", "b", "c"))
    assert read_csv_records(_write(tmp_path / "y.csv", "a,b\n1,2\n"), columns=("b",)) == (["a", "b"], [(2, ["1", "2"])])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
