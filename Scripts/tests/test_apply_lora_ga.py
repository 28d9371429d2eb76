"""Tests of Scripts/apply_lora_ga.py on tiny fake models built here with numpy.

What: builds base models (F32 in two shards with a `model.` prefix, BF16, F16, a
fan_in_fan_out model) and PEFT adapters in a temp dir, runs the script as a user
would, and checks the output independently of the script's own code:
W_new = round(W_old − scaling · B @ A), untargeted tensors byte-identical,
--check passes on good output and fails on tampered or un-offset output, and a
module missing from the base is reported without writing anything.

Usage:   python3 -m pytest Scripts/tests -q          (from the repository root)
Example: python3 -m pytest Scripts/tests/test_apply_lora_ga.py -q -k bf16
"""

import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(SCRIPTS, "apply_lora_ga.py")


# ---------------------------------------------------------------- helpers, independent of the script


def bf16_bits(values):
    """float → BF16 bit patterns, round to nearest even (written independently of the script)."""
    out = []
    for x in np.asarray(values, dtype=np.float32).ravel():
        bits = struct.unpack("<I", struct.pack("<f", float(x)))[0]
        lsb = (bits >> 16) & 1
        out.append(((bits + 0x7FFF + lsb) >> 16) & 0xFFFF)
    return np.array(out, dtype="<u2").reshape(np.shape(values))


def bf16_values(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def write_safetensors(path, tensors, metadata=None):
    """tensors: name → (dtype string, shape, raw little-endian bytes). Deliberately unsorted order."""
    header, data, offset = {}, b"", 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def read_raw(path):
    """name → (dtype, shape, bytes) from a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]: v["data_offsets"][1]]) for k, v in header.items()}


def as_float(dtype, shape, raw):
    if dtype == "BF16":
        return bf16_values(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    return np.frombuffer(raw, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).astype(np.float64).reshape(shape)


def make_adapter(directory, modules, rank, alpha, rng, rslora=False, dtype="F32", fan_in_fan_out=False):
    """modules: module → (out, in). Returns module → (A, B) as float64 of the stored values."""
    os.makedirs(directory, exist_ok=True)
    tensors, factors = {}, {}
    for module, (out_features, in_features) in modules.items():
        # LoRA-GA-like magnitudes: orthonormal-ish rows scaled by out^(1/4)/4.
        c = out_features ** 0.25 / 4
        a = rng.standard_normal((rank, in_features)) / math.sqrt(in_features) * c
        b = rng.standard_normal((out_features, rank)) / math.sqrt(out_features) * c
        stored = []
        for factor, value in (("A", a), ("B", b)):
            name = f"base_model.model.{module}.lora_{factor}.weight"
            if dtype == "BF16":
                bits = bf16_bits(value)
                tensors[name] = ("BF16", value.shape, bits.tobytes())
                stored.append(bf16_values(bits))
            else:
                v32 = value.astype("<f4")
                tensors[name] = ("F32", value.shape, v32.tobytes())
                stored.append(v32.astype(np.float64))
        factors[module] = tuple(stored)
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": sorted(modules), "fan_in_fan_out": fan_in_fan_out, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return factors


def run(*args):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def scaling(alpha, rank, rslora=False):
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# ---------------------------------------------------------------- tests


def test_f32_two_shards_with_prefix(tmp_path):
    rng = np.random.default_rng(1)
    modules = {"layers.0.q_proj": (24, 16), "layers.0.down_proj": (16, 40), "layers.1.q_proj": (24, 16)}
    factors = make_adapter(tmp_path / "adapter", modules, rank=4, alpha=8, rng=rng)
    base = tmp_path / "base"
    base.mkdir()
    weights = {m: rng.standard_normal(s).astype(np.float32) * 0.05 for m, s in modules.items()}
    shard1 = {"model.layers.0.q_proj.weight": weights["layers.0.q_proj"],
              "model.layers.0.down_proj.weight": weights["layers.0.down_proj"],
              "model.embed_tokens.weight": rng.standard_normal((50, 16)).astype(np.float32),
              "model.layers.0.q_proj.bias": rng.standard_normal(24).astype(np.float32)}
    shard2 = {"model.layers.1.q_proj.weight": weights["layers.1.q_proj"],
              "model.norm.weight": np.ones(16, np.float32),
              "model.position_ids": np.arange(12, dtype=np.int64).reshape(1, 12)}
    save_file(shard1, str(base / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(shard2, str(base / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text('{"model_type": "fake"}')

    out = tmp_path / "new"
    # Without --prefix nothing matches: error, suggestion, no output.
    code, text = run("--adapter", str(tmp_path / "adapter"), "--base", str(base), "--output", str(out))
    assert code == 2, text
    assert "layers.0.q_proj" in text and "--prefix model" in text
    assert not out.exists()

    code, text = run("--adapter", str(tmp_path / "adapter"), "--base", str(base), "--output", str(out),
                     "--prefix", "model", "--json", str(tmp_path / "stats.json"))
    assert code == 0, text
    assert "‖offset‖_F" in text and "layers.0.down_proj" in text
    assert (out / "config.json").read_text() == '{"model_type": "fake"}'

    s = scaling(8, 4)
    new1 = load_file(str(out / "model-00001-of-00002.safetensors"))
    new2 = load_file(str(out / "model-00002-of-00002.safetensors"))
    new = {**new1, **new2}
    for module, w in weights.items():
        a, b = factors[module]
        expected = (w.astype(np.float64) - s * (b @ a)).astype(np.float32)
        got = new["model." + module + ".weight"]
        assert got.dtype == np.float32 and got.shape == w.shape
        np.testing.assert_allclose(got, expected, rtol=2e-7, atol=1e-9)
        # The offset is really there (not a copy of the base).
        assert np.linalg.norm(got - w) > 0.5 * np.linalg.norm(s * (b @ a))
    for name in ("model.embed_tokens.weight", "model.layers.0.q_proj.bias"):
        assert np.array_equal(new1[name], shard1[name])
    assert np.array_equal(new2["model.position_ids"], shard2["model.position_ids"])
    assert np.array_equal(new2["model.norm.weight"], shard2["model.norm.weight"])

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["ok"] and len(stats["layers"]) == 3
    for layer in stats["layers"]:
        a, b = factors[layer["module"]]
        assert layer["offset_norm"] == pytest.approx(s * np.linalg.norm(b @ a), rel=1e-9)

    code, text = run("--check", "--adapter", str(tmp_path / "adapter"), "--base", str(base),
                     "--output", str(out), "--prefix", "model.")
    assert code == 0, text
    assert "check passed" in text

    # Refuses to overwrite without --force.
    code, text = run("--adapter", str(tmp_path / "adapter"), "--base", str(base), "--output", str(out), "--prefix", "model")
    assert code == 2 and "--force" in text


@pytest.mark.parametrize("adapter_dtype", ["F32", "BF16"])
def test_bf16_base_rslora(tmp_path, adapter_dtype):
    rng = np.random.default_rng(2)
    modules = {"encoder.layer.0.attention.self.query": (32, 32), "encoder.layer.0.intermediate.dense": (64, 32)}
    factors = make_adapter(tmp_path / "adapter", modules, rank=2, alpha=16, rng=rng, rslora=True, dtype=adapter_dtype)
    tensors, old = {}, {}
    for module, shape in modules.items():
        bits = bf16_bits(rng.standard_normal(shape) * 0.05)
        tensors["bert." + module + ".weight"] = ("BF16", shape, bits.tobytes())
        old[module] = bf16_values(bits)
    tensors["bert.embeddings.LayerNorm.weight"] = ("BF16", (32,), bf16_bits(np.ones(32)).tobytes())
    base_file = tmp_path / "bert.safetensors"
    write_safetensors(base_file, tensors, {"format": "pt"})

    out = tmp_path / "new"
    code, text = run("--adapter", str(tmp_path / "adapter"), "--base", str(base_file), "--output", str(out), "--prefix", "bert.")
    assert code == 0, text
    written = read_raw(out / "bert.safetensors")
    s = scaling(16, 2, rslora=True)
    for module in modules:
        a, b = factors[module]
        dtype, shape, raw = written["bert." + module + ".weight"]
        assert dtype == "BF16" and shape == modules[module]
        got = as_float(dtype, shape, raw)
        exact = old[module] - s * (b @ a)
        # Correct rounding to BF16: within half an ulp (2^-8 relative) of the exact result,
        # and equal to the independent rounding nearly everywhere (ties via float32 may differ).
        assert np.all(np.abs(got - exact) <= 2.0 ** -8 * np.abs(exact) * 1.0001 + 1e-30)
        assert np.mean(got == bf16_values(bf16_bits(exact))) > 0.99
        assert np.any(got != old[module])
    assert written["bert.embeddings.LayerNorm.weight"] == tensors["bert.embeddings.LayerNorm.weight"]
    # Header (and so metadata, tensor order and offsets) is unchanged.
    with open(base_file, "rb") as f1, open(out / "bert.safetensors", "rb") as f2:
        n = struct.unpack("<Q", f1.read(8))[0]
        assert f2.read(8 + n)[8:] == f1.read(n)

    code, text = run("--check", "--adapter", str(tmp_path / "adapter"), "--base", str(base_file), "--output", str(out), "--prefix", "bert")
    assert code == 0, text


def test_check_detects_wrong_output(tmp_path):
    rng = np.random.default_rng(3)
    modules = {"mlp.fc1": (20, 12), "mlp.fc2": (12, 20)}
    factors = make_adapter(tmp_path / "adapter", modules, rank=3, alpha=6, rng=rng)
    base = {m + ".weight": (rng.standard_normal(s) * 0.1).astype(np.float32) for m, s in modules.items()}
    base["ln.weight"] = np.ones(12, np.float32)
    base_file = tmp_path / "model.safetensors"
    save_file(base, str(base_file))
    args = ["--adapter", str(tmp_path / "adapter"), "--base", str(base_file)]

    # 1. An un-offset copy of the base fails the check.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(base_file, plain / "model.safetensors")
    code, text = run("--check", *args, "--output", str(plain))
    assert code == 1, text
    assert "mlp.fc1" in text and "FAIL" in text

    out = tmp_path / "new"
    code, text = run(*args, "--output", str(out))
    assert code == 0, text
    assert run("--check", *args, "--output", str(out))[0] == 0

    # 2. One element of a targeted weight off by a few F32 ulps fails.
    tampered = dict(load_file(str(out / "model.safetensors")))
    w = tampered["mlp.fc2.weight"].copy()
    w[3, 7] = np.nextafter(np.nextafter(np.nextafter(w[3, 7], np.inf, dtype=np.float32), np.inf, dtype=np.float32), np.inf, dtype=np.float32)
    tampered["mlp.fc2.weight"] = w
    save_file(tampered, str(out / "model.safetensors"))
    code, text = run("--check", *args, "--output", str(out))
    assert code == 1 and "mlp.fc2" in text and "1 of 240" in text, text

    # 3. An untargeted tensor changed fails.
    code, _ = run(*args, "--output", str(out), "--force")
    assert code == 0
    tampered = dict(load_file(str(out / "model.safetensors")))
    tampered["ln.weight"] = tampered["ln.weight"] * 2
    save_file(tampered, str(out / "model.safetensors"))
    code, text = run("--check", *args, "--output", str(out))
    assert code == 1 and "ln.weight" in text, text

    # 4. Changed metadata (header) fails even when every tensor is right.
    code, _ = run(*args, "--output", str(out), "--force")
    assert code == 0
    save_file(dict(load_file(str(out / "model.safetensors"))), str(out / "model.safetensors"), metadata={"format": "np"})
    code, text = run("--check", *args, "--output", str(out))
    assert code == 1 and "header differs" in text, text

    # 5. The check uses the adapter: different factors fail against a correct output.
    code, _ = run(*args, "--output", str(out), "--force")
    assert code == 0
    make_adapter(tmp_path / "adapter", modules, rank=3, alpha=6, rng=np.random.default_rng(99))
    code, text = run("--check", *args, "--output", str(out))
    assert code == 1, text


def test_shape_mismatch_and_missing_module_are_reported(tmp_path):
    rng = np.random.default_rng(4)
    make_adapter(tmp_path / "adapter", {"a.proj": (8, 6), "b.proj": (8, 6), "c.proj": (8, 6)}, rank=2, alpha=4, rng=rng)
    save_file({"a.proj.weight": np.zeros((6, 8), np.float32), "b.proj.weight": np.zeros((8, 6), np.float32)},
              str(tmp_path / "m.safetensors"))
    code, text = run("--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "m.safetensors"),
                     "--output", str(tmp_path / "new"))
    assert code == 2
    assert "2 of 3 adapter modules" in text
    assert "a.proj" in text and "transposed" in text
    assert "c.proj: not found" in text
    assert not (tmp_path / "new").exists()


def test_f16_fan_in_fan_out_in_small_row_blocks(tmp_path, monkeypatch):
    """In-process with tiny row blocks, so every layer spans many blocks (one ragged)."""
    spec = importlib.util.spec_from_file_location("apply_lora_ga", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "apply_lora_ga", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 7)

    rng = np.random.default_rng(5)
    modules = {"h.0.attn.c_attn": (18, 6), "h.0.mlp.c_fc": (10, 6)}  # (out, in)
    factors = make_adapter(tmp_path / "adapter", modules, rank=2, alpha=32, rng=rng, fan_in_fan_out=True)
    # GPT-2 Conv1D stores [in, out].
    base = {m + ".weight": (rng.standard_normal((s[1], s[0])) * 0.02).astype(np.float16) for m, s in modules.items()}
    save_file(base, str(tmp_path / "gpt.safetensors"))
    out = tmp_path / "new"
    assert module.main(["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "gpt.safetensors"),
                        "--output", str(out)]) == 0
    new = load_file(str(out / "gpt.safetensors"))
    s = scaling(32, 2)
    for name, (out_features, in_features) in modules.items():
        a, b = factors[name]
        expected = (base[name + ".weight"].astype(np.float64) - s * (b @ a).T).astype(np.float16)
        got = new[name + ".weight"]
        assert got.dtype == np.float16 and got.shape == (in_features, out_features)
        assert np.array_equal(got, expected)
    assert module.main(["--check", "--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "gpt.safetensors"),
                        "--output", str(out)]) == 0
