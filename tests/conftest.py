"""Shared fixtures: tiny model families built once per session, and the parity report.

Why session scope: building a family is cheap (~50 ms) but every merge test reads
the same folders, and a merge's output is a pure function of them, so sharing is safe.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# huggingface_hub reads these at import: set them before anything imports it. Xet storage cannot
# be served by localhub, and no test may touch a real Hub cache or token.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mergebot-tests-hf-home-")
os.environ.pop("HF_TOKEN", None)

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package: make helpers importable

from tiny_models import Family, ModelSpec, build_family

FamilyFactory = Callable[..., Family]


@pytest.fixture(scope="session")
def family_factory(tmp_path_factory: pytest.TempPathFactory) -> FamilyFactory:
    """Build (once per distinct arguments) a base + fine-tunes family under a session temp dir."""
    cache: dict[tuple[object, ...], Family] = {}

    def make(spec: ModelSpec, *, n_finetunes: int = 3, seed: int = 0, delta_scale: float = 2e-2) -> Family:
        key = (spec, n_finetunes, seed, delta_scale)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"family-{spec.arch}-{spec.dtype}-s{seed}")
            cache[key] = build_family(root, spec, n_finetunes=n_finetunes, seed=seed, delta_scale=delta_scale)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_family(family_factory: FamilyFactory) -> Family:
    """Llama, bf16, untied embeddings, one safetensors file, base + 3 fine-tunes."""
    return family_factory(ModelSpec(arch="llama"), seed=1)


@pytest.fixture(scope="session")
def qwen2_family(family_factory: FamilyFactory) -> Family:
    """Qwen2 (q/k/v biases, ``layer_types``), bf16, tied embeddings, sharded, base + 3 fine-tunes."""
    return family_factory(ModelSpec(arch="qwen2", tie_word_embeddings=True, max_shard_size="40KB"), seed=2)


@pytest.fixture(scope="session")
def mistral_family(family_factory: FamilyFactory) -> Family:
    """Mistral, bf16, untied, sharded, 6 layers, base + 3 fine-tunes."""
    return family_factory(ModelSpec(arch="mistral", num_layers=6, max_shard_size="40KB"), seed=3)


@pytest.fixture(scope="session")
def llama_family_f32(family_factory: FamilyFactory) -> Family:
    """Llama in float32 (no storage rounding: DARE masks are readable from the output)."""
    return family_factory(ModelSpec(arch="llama", dtype="float32", tie_word_embeddings=True), seed=4)


@pytest.fixture(scope="session")
def qwen2_family_f32(family_factory: FamilyFactory) -> Family:
    """Qwen2 in float32, untied, one file."""
    return family_factory(ModelSpec(arch="qwen2", dtype="float32"), seed=5)


@pytest.fixture(scope="session")
def distant_pair(family_factory: FamilyFactory) -> Callable[[str], Family]:
    """Two unrelated models per architecture (deltas as large as the weights), for real SLERP.

    A 2% fine-tune is nearly collinear with its base (cos > 0.9995), where SLERP falls
    back to linear interpolation; unrelated weights exercise the spherical branch.
    """

    def make(arch: str) -> Family:
        spec = ModelSpec(arch=arch, tie_word_embeddings=arch == "qwen2")  # type: ignore[arg-type]
        return family_factory(spec, n_finetunes=1, seed=10, delta_scale=1.0)

    return make


# --- parity figures -------------------------------------------------------------------------
# Largest per-tensor differences against mergekit, printed at the end of the run: the lead
# tracks them across engine changes, and a failing tolerance says nothing about the margin.

_REPORT_KEY = pytest.StashKey[dict[str, tuple[float, str]]]()


@pytest.fixture(scope="session")
def parity_report(pytestconfig: pytest.Config) -> Iterator[Callable[[str, str, float], None]]:
    """``record(method, where, rel_diff)`` keeps the largest relative difference per method."""
    table = pytestconfig.stash.setdefault(_REPORT_KEY, {})

    def record(method: str, where: str, value: float) -> None:
        if method not in table or value > table[method][0]:
            table[method] = (value, where)

    yield record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    table = config.stash.get(_REPORT_KEY, {})
    if not table:
        return
    terminalreporter.section("largest relative L2 difference vs mergekit, per method")
    for method in sorted(table):
        value, where = table[method]
        terminalreporter.write_line(f"{method:<28} {value:.3e}  ({where})")
