"""Tests of the torch-free parts of Scripts/write_gradients.py (the command line of lora_ga.recorder).

What: the streaming safetensors writer produces files the `safetensors` package and
apply_lora_ga.py's reader agree on (F32, F16, BF16 bit patterns, metadata, alignment);
it refuses a producer that returns the wrong size and leaves no partial file; importing
the module and --help work without torch (torch must stay a lazy import). The torch
paths (GradientRecorder, collect_gradients, the demo) need PyTorch and are only
syntax-checked here: python3 -m py_compile Scripts/write_gradients.py

Usage:   python3 -m pytest Scripts/tests -q
Example: python3 -m pytest Scripts/tests/test_write_gradients.py -q
"""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_import_and_help_without_torch():
    code = ("import sys; sys.path.insert(0, %r); import write_gradients; import lora_ga.recorder; "
            "assert write_gradients.GradientRecorder is lora_ga.recorder.GradientRecorder; "
            "assert 'torch' not in sys.modules, 'torch imported eagerly'; print('ok')") % SCRIPTS
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "write_gradients.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--model" in result.stdout and "rank{R}" in result.stdout


def test_writer_round_trip(tmp_path):
    wg = load("write_gradients")
    apply = load("apply_lora_ga")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 5)).astype("<f4")
    h = rng.standard_normal((3, 7)).astype("<f2")
    b = rng.standard_normal((4, 3)).astype(np.float32)
    b_bits = (b.view(np.uint32) >> 16).astype("<u2")  # truncated BF16 patterns, exact to compare
    path = wg.write_safetensors(str(tmp_path / "rank3" / "grads.safetensors"), [
        ("layers.0.q.weight", "F32", q.shape, lambda: q),
        ("layers.0.h.weight", "F16", h.shape, lambda: h),
        ("layers.0.b.weight", "BF16", b.shape, lambda: b_bits),
    ], metadata={"micro_batches": 4, "rank": 3})
    assert path == wg.grads_path(str(tmp_path), 3)
    assert os.listdir(tmp_path / "rank3") == ["grads.safetensors"]

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert (8 + n) % 8 == 0
        header = json.loads(f.read(n))
    assert header["__metadata__"] == {"micro_batches": "4", "rank": "3"}

    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["micro_batches"] == "4"
        assert np.array_equal(f.get_tensor("layers.0.q.weight"), q)
        assert np.array_equal(f.get_tensor("layers.0.h.weight"), h)
    reader = apply.SafeTensors(path)
    assert reader.entries["layers.0.b.weight"].dtype == "BF16"
    expected = (b_bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(reader.read("layers.0.b.weight"), expected.astype(np.float64))
    assert np.array_equal(reader.read("layers.0.q.weight"), q.astype(np.float64))


def test_writer_rejects_wrong_size_and_leaves_nothing(tmp_path):
    wg = load("write_gradients")
    target = tmp_path / "rank0" / "grads.safetensors"
    with pytest.raises(ValueError, match="produced"):
        wg.write_safetensors(str(target), [("w.weight", "F32", (4, 4), lambda: np.zeros((4, 3), "<f4"))])
    assert not target.exists()
    assert os.listdir(tmp_path / "rank0") == []
    with pytest.raises(ValueError, match="repeated"):
        wg.write_safetensors(str(target), [("w", "F32", (1,), lambda: np.zeros(1, "<f4"))] * 2)


def test_rank_from_environment():
    # In a fresh interpreter: once torch is loaded (other tests), an initialized process
    # group would take precedence.
    code = ("import sys; sys.path.insert(0, %r); import write_gradients as wg; "
            "print(wg.rank_and_world())") % SCRIPTS
    for environment, expected in (({"RANK": "5", "WORLD_SIZE": "8"}, "(5, 8)"), ({}, "(0, 1)")):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **environment})
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr
