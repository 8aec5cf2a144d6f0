"""The house's seams, checked from outside the package (docs/architecture.md).

- a toy dataset is added by registering one protocol (no file of cxrdebias touched) and trains
  end to end through the one runner, its ``data:`` section validated by its own config;
- a toy method is added by registering one class and trains through the same runner;
- the package has no import cycle, imports no private name across modules, and every module
  reads in one sitting (≤ 450 lines, or a ``Size:`` reason at its top).

The layer contracts themselves are import-linter's (``lint-imports``, pyproject.toml, .ci/run).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from cxrdebias.data.base import TensorSamples
from cxrdebias.debias import Method, MethodOptions, register_method, unregister_method
from cxrdebias.errors import ConfigError
from cxrdebias.experiments import protocols
from cxrdebias.experiments.config import load_config
from cxrdebias.experiments.protocols.accuracy import accuracy_protocol
from cxrdebias.experiments.registry import ProtocolSpec
from cxrdebias.experiments.runner import default_run_name, run_experiment

PACKAGE = Path(__file__).resolve().parents[1] / "cxrdebias"
MAX_LINES = 450


# -- a toy dataset, registered from outside -----------------------------------------------------------
class ToyConfig(BaseModel):
    """Squares whose brightness is the label and whose corner mark is the (aligned) bias."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["toy_squares"] = "toy_squares"
    n: int = 64
    image_size: int = 8


def _toy_samples(n: int, size: int, seed: int, aligned: bool) -> TensorSamples:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    biases = targets.clone() if aligned else torch.randint(0, 2, (n,), generator=g)
    images = torch.rand(n, 3, size, size, generator=g) * 0.2 + targets.view(-1, 1, 1, 1) * 0.5
    images[:, 0, :2, :2] = biases.view(-1, 1, 1).float()
    return TensorSamples(images=images, targets=targets, biases=biases, name="toy")


def build_toy(cfg, method, run, console):
    d = cfg.data
    train = _toy_samples(d.n, d.image_size, cfg.seed, aligned=True)
    test = _toy_samples(d.n, d.image_size, cfg.seed + 1, aligned=False)
    return accuracy_protocol(
        cfg,
        experiment="toy_squares",
        title="[bold]Toy squares[/]",
        train=train,
        val=test,
        tests={"unbiased": test},
        num_classes=2,
        num_biases=2,
        eval_batch_size=32,
        data_info=lambda: {"dataset_sha256": "toy", "n": d.n},
        val_metrics=("accuracy",),
        summarise=lambda tests, last: {"unbiased_accuracy": tests["unbiased"]["accuracy"]},
        headline=("unbiased_accuracy",),
        params={"n": d.n},
    )


TOY = ProtocolSpec(kind="toy_squares", config=ToyConfig, build=build_toy, run_tag=lambda cfg: "toy", command="(test)")


# -- a toy method, registered from outside ----------------------------------------------------------
class HalfCEOptions(MethodOptions):
    scale: float = 0.5


class HalfCE(Method):
    """Cross-entropy times a constant: the smallest method that has an option."""

    name = "half_ce"
    summary = "scaled cross-entropy (test method)"
    Options = HalfCEOptions

    def compute_loss(self, model, batch, output):
        ce = self.classification_loss(output.logits, batch["target"])
        return self.options.scale * ce, {"ce": ce.detach()}


@pytest.fixture
def toy_registered():
    protocols.register(TOY)
    register_method(HalfCE)
    try:
        yield
    finally:
        protocols.unregister(TOY.kind)
        unregister_method(HalfCE.name)


def _toy_config(method: str = "vanilla", *extra: str):
    return load_config(
        None,
        [
            "data.kind=toy_squares", "data.n=48", "model.arch=simple_conv", "model.kernel_size=3",
            "train.epochs=1", "train.batch_size=16", "train.progress=false", "train.num_threads=1",
            f"method.name={method}", *extra,
        ],
    )


def test_a_dataset_registered_from_outside_trains_through_the_runner(toy_registered, tmp_path):
    cfg = _toy_config()
    assert cfg.data.kind == "toy_squares" and isinstance(cfg.data, ToyConfig)
    assert default_run_name(cfg).startswith("toy-vanilla-seed42-")
    res = run_experiment(cfg, tmp_path / "run")
    assert res["experiment"] == "toy_squares" and res["n"] == 48 and res["epochs"] == 1
    assert 0.0 <= res["metrics"]["unbiased_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"] == res["metrics"] and saved["data"] == {"dataset_sha256": "toy", "n": 48}
    assert saved["config"]["data"] == {"kind": "toy_squares", "n": 48, "image_size": 8}
    # the resolved config of the run loads back (resume, evaluate) while the kind is registered
    assert load_config(None, None, base=saved["config"]).data == cfg.data


def test_a_protocol_names_its_splits(toy_registered):
    cfg = _toy_config()
    proto = protocols.get("toy_squares").build(cfg, None, None, None)
    assert proto.split("unbiased") is proto.split("val") and len(proto.split("train")) == 48
    with pytest.raises(ConfigError, match=r"split 'test': this run has train, val, unbiased"):
        proto.split("test")


def test_a_registered_dataset_validates_its_own_section(toy_registered):
    with pytest.raises(ConfigError, match=r"data.n: Input should be a valid integer"):
        _toy_config("vanilla", "data.n=many")
    with pytest.raises(ConfigError, match=r"data.colour: unknown option"):
        _toy_config("vanilla", "data.colour=red")


def test_an_unknown_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown dataset kind 'nope' \(known: biased_mnist, cxr, celeba, imdb_face"):
        load_config(None, ["data.kind=nope"])


def test_a_kind_cannot_be_registered_twice_or_without_its_config(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        protocols.register(ProtocolSpec(kind="toy_squares", config=ToyConfig, build=print, run_tag=str, command="x"))
    with pytest.raises(ValueError, match="field `kind` defaulting to 'other'"):
        protocols.register(ProtocolSpec(kind="other", config=ToyConfig, build=build_toy, run_tag=str, command="x"))


def test_a_method_registered_from_outside_trains_with_its_options(toy_registered, tmp_path):
    res = run_experiment(_toy_config("half_ce", "method.scale=0.25"), tmp_path / "run")
    assert res["method"]["name"] == "half_ce" and res["method"]["scale"] == 0.25
    with pytest.raises(ConfigError, match=r"method 'half_ce': scale"):
        run_experiment(_toy_config("half_ce", "method.scale=lots"), tmp_path / "other")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (HalfCE,), {}))


# -- the package's shape ----------------------------------------------------------------------------
def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every ``from … import`` in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([target] if target else [])])
            found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def test_no_private_name_is_imported_across_modules():
    bad = []
    for module, path in _modules():
        for line, target, names in _imports(path, module):
            if target.startswith("cxrdebias") and target != module:
                bad += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_package_has_no_import_cycle():
    grimp = pytest.importorskip("grimp")  # installed with import-linter (the dev extra)
    graph = grimp.build_graph("cxrdebias")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_every_module_reads_in_one_sitting():
    long = []
    for module, path in _modules():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "Size:" not in doc:
            long.append(f"{module}: {lines} lines and no 'Size:' reason in its docstring")
    assert not long, "\n".join(long)


def test_the_command_line_starts_without_importing_torch():
    """``cxrdebias --help`` stays fast: the commands import the library when they run."""
    import subprocess
    import sys

    code = "import sys, cxrdebias.cli; print(sorted(m for m in ('torch', 'pandas', 'cxrdebias.experiments') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_viewer_page_imports_only_the_torch_free_side():
    """apps/viewer.py lies outside the package (import-linter does not see it): every module it
    imports loads without torch."""
    import subprocess
    import sys

    page = PACKAGE.parent / "apps" / "viewer.py"
    tree = ast.parse(page.read_text())
    modules = sorted(
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module != "__future__"}
        | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    )
    assert "cxrdebias.deploy.runtime" in modules
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
