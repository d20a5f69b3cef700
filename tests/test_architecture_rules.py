"""Guards on the shape of the code base: the public API and the direction of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import (space -> bot -> engine; localhub stands alone)
FORBIDDEN = {
    "engine": {"bot", "space", "localhub", "mergebot"},
    "bot": {"space", "mergebot"},
    "localhub": {"engine", "bot", "space", "mergebot"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_imports_point_one_way() -> None:
    for package, forbidden in FORBIDDEN.items():
        if not (ROOT / package).exists():
            continue
        imported = imported_packages(package)
        bad = {name: sorted(files) for name, files in imported.items() if name in forbidden}
        assert not bad, f"{package} must not import {sorted(bad)}: {bad}"


def test_engine_public_api_is_deliberate() -> None:
    assert sorted(engine.__all__) == sorted(
        [
            "METHODS",
            "Audit",
            "OpenModels",
            "parse_hub_reference",
            "raise_for_audit",
            "IncompatibleModelsError",
            "MergeConfig",
            "MergeError",
            "MergeOptions",
            "MergePlan",
            "MergeResult",
            "ModelNotFoundError",
            "ModelReport",
            "OutputError",
            "RecipeError",
            "SafetensorsFormatError",
            "UnsafeWeightsError",
            "audit_models",
            "build_plan",
            "get_method",
            "load_recipe",
            "plan_merge",
            "run_merge",
            "validate_recipe",
        ]
    )
    for name in engine.__all__:
        assert hasattr(engine, name)


def test_the_merge_path_does_not_import_transformers() -> None:
    # transformers takes seconds to import; `mergebot merge` must not pay for it
    code = (
        "import sys, engine.cli, engine.run; print('transformers' in sys.modules, 'mergekit' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
