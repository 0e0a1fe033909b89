"""What a checkpoint directory holds, as names: file names, the refused pickle suffixes,
the dtypes and their sizes, and the one file digest.

Torch-free on purpose: the service's API process (`store.remote_models`, `api.estimates`
through `hcnr_core.estimate`) checks listings, headers and sizes with these without
importing torch; `hcnr_core.checkpoint` maps the same names to torch dtypes. One table,
so the estimate and the repair cannot disagree about a dtype.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# safetensors header dtype code -> torch dtype name (`getattr(torch, name)`). A code not
# listed (integer buffers) counts as float32, as the repair has always read it.
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
# The compute dtypes a config may name besides "auto" (= the stored dtype); must match
# `hcnr_core.config.DType` (tests/test_formats.py).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
