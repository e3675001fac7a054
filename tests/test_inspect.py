"""`hybridserve inspect` on a checkpoint with one renamed and one mis-shaped tensor names both, and
loading the same checkpoint fails with that report instead of a stack trace."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.weights.checkpoint import CheckpointError
from hybridserve.weights.synth import write_synthetic

RENAMED = "model.layers.1.self_attn.k_proj.weight"
MISSHAPED = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = write_synthetic("spartacus", "tiny", tmp_path_factory.mktemp("broken") / "spartacus")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.self_attn.key_proj.weight"] = tensors.pop(RENAMED)
    tensors[MISSHAPED] = torch.zeros(tensors[MISSHAPED].shape[0] + 3, tensors[MISSHAPED].shape[1])
    save_file(tensors, str(d / "model.safetensors"))
    return d


def inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridserve.server.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_inspect_good_checkpoint(tmp_path):
    d = write_synthetic("neollm", "tiny", tmp_path / "neollm")
    run = inspect(d)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "architecture: neollm" in run.stdout and "all tensors match" in run.stdout
    assert "state gdn" in run.stdout and "KV cache" in run.stdout


def test_inspect_names_renamed_and_misshaped(broken):
    run = inspect(broken)
    assert run.returncode == 1, run.stdout + run.stderr
    for name in (RENAMED, "key_proj", MISSHAPED):
        assert name in run.stdout, run.stdout
    assert "Traceback" not in run.stderr


def test_loading_fails_with_the_same_report(broken):
    with pytest.raises(CheckpointError) as e:
        build_llm_engine(EngineConfig(model=str(broken), device="cpu", dtype="float32"))
    for name in (RENAMED, "key_proj", MISSHAPED):
        assert name in str(e.value)
