"""The command line: help, version, a tiny end-to-end run, and one-line errors for bad input."""

import json

import pytest

from cxrdebias import __version__
from tests.conftest import run_cli


def test_version(monkeypatch, capsys):
    code, out, _ = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0 and __version__ in out


def test_help_lists_every_command(monkeypatch, capsys):
    code, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0
    for cmd in ("reproduce", "methods", "demo"):
        assert cmd in out


def _tiny(fake_mnist, out):
    return [
        "reproduce", "biased-mnist", "--data-root", str(fake_mnist), "--rho", "0.99",
        "--epochs", "1", "--out", str(out), "--set", "train.batch_size=64", "--set", "train.progress=false",
        "--set", "model.kernel_size=3",
    ]


def test_reproduce_end_to_end(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli([*_tiny(fake_mnist, out), "--method", "end", "--alpha", "0.2", "--beta", "0.3"], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == {"name": "end", "alpha": 0.2, "beta": 0.3, "form": "partner_mean"}
    assert 0 <= res["metrics"]["unbiased_accuracy"] <= 1 and 0 <= res["metrics"]["biased_accuracy"] <= 1
    assert res["config"]["data"]["rho"] == 0.99
    assert len(res["data"]["source_sha256"]) == 64
    assert res["code_version"]["package"] == __version__
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert "unbiased_accuracy=" in stdout


def test_existing_output_is_not_overwritten(fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(_tiny(fake_mnist, out), monkeypatch, capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--rho", "1.5"], "(0, 1]"),
        (["--rho", "0"], "(0, 1]"),
        (["--set", "train.epochs=0"], "train.epochs"),
        (["--set", "train.nonsense=1"], "unknown option"),
        (["--method", "vanilla", "--alpha", "0.1"], "vanilla"),
        (["--method", "end", "--form", "other"], "form"),
    ],
)
def test_bad_options_give_one_line_errors(extra, message, fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli([*_tiny(fake_mnist, out), *extra], monkeypatch, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing written for a rejected run


def test_missing_and_corrupt_mnist(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["reproduce", "biased-mnist", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and "MNIST folder not found" in err
    raw = tmp_path / "bad" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code, _, err = run_cli(["reproduce", "biased-mnist", "--data-root", str(tmp_path / "bad"), "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and "train-images-idx3-ubyte" in err


def test_methods_lists_end(monkeypatch, capsys):
    code, out, _ = run_cli(["methods"], monkeypatch, capsys)
    assert code == 0 and "end" in out and "vanilla" in out


@pytest.mark.parametrize("method", ["vanilla", "end", "lnl", "blindeye", "rebias", "groupdro", "lff"])
def test_every_method_runs_on_biased_mnist(method, fake_mnist, tmp_path, monkeypatch, capsys):
    out = tmp_path / method
    args = [*_tiny(fake_mnist, out), "--method", method, "--set", "data.limit_train=128", "--set", "data.limit_test=64"]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["name"] == method
    assert all(k in res["metrics"] for k in ("biased_accuracy", "unbiased_accuracy"))


def test_usage_error_raised_in_a_command_is_a_message_not_a_traceback(monkeypatch, capsys):
    """A typer.BadParameter raised inside a command body (not by option parsing) is shown as a
    usage error with exit code 2, whichever click typer bundles."""
    code, out, err = run_cli(["reproduce", "biased-mnist", "--resume"], monkeypatch, capsys)
    assert code == 2
    assert "--resume needs --out RUN_FOLDER" in err
    assert "Traceback" not in err + out


def test_main_exits_130_on_ctrl_c_and_143_on_a_sigterm_that_stopped_a_sweep(monkeypatch, capsys):
    import importlib

    from cxrdebias.experiments.benchmark import Terminated

    cli_app = importlib.import_module("cxrdebias.cli.app")  # the module (the package exports the Typer app under this name)

    for raised, code, word in ((KeyboardInterrupt(), 130, "interrupted"), (Terminated(), 143, "terminated")):
        monkeypatch.setattr(cli_app, "app", lambda standalone_mode, exc=raised: (_ for _ in ()).throw(exc))
        with pytest.raises(SystemExit) as info:
            cli_app.main()
        assert info.value.code == code and capsys.readouterr().err.strip() == word
