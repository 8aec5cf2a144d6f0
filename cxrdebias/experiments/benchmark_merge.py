"""``cxrdebias benchmark --merge FILE``: the cells of another benchmark's ``benchmark.json`` (cells
run on another machine, or an earlier table whose cell folders were not kept) added to a table,
refused where they would mix different experiments (:func:`merge_cells`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrdebias.errors import ConfigError, DataError
from cxrdebias.evaluation.report import none_to_nan
from cxrdebias.experiments.benchmark import BenchmarkSpec
from cxrdebias.fileio import read_json_file

#: what makes two recipes the same experiment (the label is only how the table names it)
RECIPE_KEYS = ("method", "bias", "data", "set", "from", "evaluate")
#: what makes two specs' cells comparable (seeds and recipe lists may differ)
SPEC_KEYS = ("config", "set", "n_boot", "baseline", "reference")
MERGE_MAX_BYTES = 64 * 1024 * 1024


def merge_cells(
    spec: BenchmarkSpec, rows: list[dict[str, Any]], path: str | Path, numbers: Sequence[str]
) -> tuple[list[dict[str, Any]], int]:
    """``rows`` plus the cells of another benchmark's ``benchmark.json`` (e.g. one run on another
    machine, whose cell folders were not kept). Returns the merged rows and how many were added.

    Refused, with the file and field named: a file that is not a benchmark table, a spec that
    differs in what the cells mean (training config, overrides, data source and generator,
    baseline/reference, or the definition of a recipe both have), a cell of a recipe this spec
    does not have. ``numbers``: the metric keys every cell must have. A cell in both must give
    the same numbers (a reproducibility check: same commit, same seeds); one that does not is an
    error naming the cell, the metric and the precision it trained in here."""
    path = Path(path)
    try:
        doc = read_json_file(path, MERGE_MAX_BYTES)
    except DataError as exc:
        raise DataError(f"--merge {exc}") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("spec"), dict)
        or not isinstance(doc.get("cells"), list)
    ):
        raise DataError(
            f"--merge {path}: not a benchmark.json (expected an object with 'spec' and 'cells')"
        )
    theirs, ours = doc["spec"], spec.model_dump(mode="json", by_alias=True)
    for key in SPEC_KEYS:
        if theirs.get(key) != ours.get(key):
            raise ConfigError(
                f"--merge {path}: spec.{key} is {theirs.get(key)!r}, this spec's is {ours.get(key)!r}"
            )
    for key in ("synth", "manifest", "reference_manifest"):
        if (theirs.get("data") or {}).get(key) != ours["data"].get(key):
            raise ConfigError(f"--merge {path}: spec.data.{key} differs from this spec's")
    their_recipes = theirs.get("recipes") if isinstance(theirs.get("recipes"), dict) else {}
    for name in set(their_recipes) & set(ours["recipes"]):
        a, b = their_recipes[name] or {}, ours["recipes"][name]
        diff = [k for k in RECIPE_KEYS if a.get(k) != b.get(k)]
        if diff:
            raise ConfigError(
                f"--merge {path}: recipe {name!r} differs from this spec's in {', '.join(diff)}"
            )
    seen = {(r["recipe"], r["data_seed"], r["train_seed"]): r for r in rows}
    merged = list(rows)
    for i, cell in enumerate(doc["cells"]):
        where = f"--merge {path}: cells[{i}]"
        try:
            key = (str(cell["recipe"]), int(cell["data_seed"]), int(cell["train_seed"]))
            row = {**cell, "recipe": key[0], "data_seed": key[1], "train_seed": key[2],
                   **{k: none_to_nan(cell[k]) for k in numbers}, "probe_layers": {str(k): none_to_nan(v) for k, v in (cell.get("probe_layers") or {}).items()},
                   "code_version": dict(cell.get("code_version") or {})}  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{where}: expected recipe, data_seed, train_seed and {', '.join(numbers)} ({type(exc).__name__}: {exc})"
            ) from None
        if key[0] not in spec.recipes:
            raise ConfigError(
                f"{where}: recipe {key[0]!r} is not in this spec (recipes: {', '.join(spec.recipes)})"
            )
        if key[1] not in spec.data.seeds or key[2] not in spec.train_seeds:
            raise ConfigError(f"{where}: data seed {key[1]}, training seed {key[2]} are not among this spec's "
                              f"(add them with --data-seeds / --train-seeds)")  # fmt: skip
        if key in seen:
            mine = seen[key]
            for k in numbers:
                a, b = mine[k], row[k]
                if not (math.isnan(a) and math.isnan(b)) and not math.isclose(
                    a, b, rel_tol=1e-9, abs_tol=1e-12
                ):
                    raise DataError(
                        f"{where}: cell seed{key[1]}-{key[0]}-train{key[2]} is in both, with {k} {b!r} there and {a!r} here "
                        f"(trained in {mine.get('precision') or 'an unrecorded precision'} here; training is not bit-reproducible "
                        "across precisions or CPUs, so such tables are not merged)"
                    )
            continue
        seen[key] = row
        merged.append(row)
    return merged, len(merged) - len(rows)


__all__ = ["MERGE_MAX_BYTES", "RECIPE_KEYS", "SPEC_KEYS", "merge_cells"]
