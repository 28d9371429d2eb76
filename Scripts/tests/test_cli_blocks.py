"""The `lora-ga` executable on gradient files holding blocks of layers ("lora_ga.blocks").

What: files written by the `safetensors` package with the block metadata — row shards, a
column shard, an overlap — are read by `lora-ga inspect` (blocks and coverage, exit 1 when a
layer is not covered), refused by `init` when a layer is left partly uncovered (the message
names the layer and the rectangle) unless --allow-uncovered, and `init` in every mode on a
covering set gives an adapter that `verify` rates like one computed from the unsharded file.

Needs LORA_GA_BIN (the directory holding the built lora-ga; Scripts/test sets it).
Usage:   LORA_GA_BIN=.build/debug python3 -m pytest Scripts/tests/test_cli_blocks.py -q
"""

import json
import os
import re
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

BIN = os.environ.get("LORA_GA_BIN")
pytestmark = pytest.mark.skipif(not BIN or not os.path.exists(os.path.join(BIN or "", "lora-ga")),
                                reason="LORA_GA_BIN does not hold a built lora-ga")

ROWS, COLS = 96, 80


def lora_ga(*args):
    return subprocess.run([os.path.join(BIN, "lora-ga"), *map(str, args)], capture_output=True, text=True, timeout=300)


def gradient():
    rng = np.random.default_rng(5)
    u, v = rng.standard_normal((ROWS, 20)), rng.standard_normal((20, COLS))
    g = (u * 0.8 ** np.arange(20)) @ v + 0.01 * rng.standard_normal((ROWS, COLS))
    return g.astype(np.float32)


def write_block(path, g, rows, cols):
    block = np.ascontiguousarray(g[rows[0]:rows[1], cols[0]:cols[1]])
    blocks = {"x.weight": {"shape": [ROWS, COLS], "offset": [rows[0], cols[0]]}}
    save_file({"x.weight": block}, str(path), metadata={"lora_ga.blocks": json.dumps(blocks)})


@pytest.fixture()
def sharded(tmp_path):
    """g as: rows 0..<60 (dir a), rows 40..<96 × cols 0..<50 (dir b), rows 60..<96 × cols 50..<80
    (dir c); the overlap rows 40..<60 × cols 0..<50 is halved in both blocks so they add to g."""
    g = gradient()
    half = g.copy()
    half[40:60, 0:50] *= 0.5
    for name in "abc":
        (tmp_path / name).mkdir()
    write_block(tmp_path / "a" / "r0.safetensors", half, (0, 60), (0, COLS))
    write_block(tmp_path / "b" / "r1.safetensors", half, (40, ROWS), (0, 50))
    save_file({"x.weight": g}, str(tmp_path / "whole.safetensors"))
    return tmp_path, g


def test_uncovered_layer_is_refused_naming_it_then_accepted_with_the_flag(sharded):
    root, g = sharded
    dirs = [root / "a", root / "b"]
    inspect = lora_ga("inspect", *dirs)
    assert inspect.returncode == 3, inspect.stderr
    assert "UNCOVERED: rows 60..<96, cols 50..<80" in inspect.stdout
    refused = lora_ga("init", "--rank", 2, "--out", root / "out", *dirs)
    assert refused.returncode != 0
    assert "layer 'x.weight'" in refused.stderr and "rows 60..<96, cols 50..<80" in refused.stderr
    accepted = lora_ga("init", "--rank", 2, "--allow-uncovered", "--out", root / "out", *dirs)
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("mode", ["dense", "power", "sketch"])
def test_init_on_blocks_rates_like_the_whole_file(sharded, mode):
    root, g = sharded
    write_block(root / "c" / "r2.safetensors", g, (60, ROWS), (50, COLS))
    dirs = [root / "a", root / "b", root / "c"]
    inspect = lora_ga("inspect", *dirs)
    assert inspect.returncode == 0 and "| x.weight | 96×80 | F32 | 0 | 3 | complete |" in inspect.stdout, inspect.stdout
    ratios = []
    for label, inputs in [("blocks", dirs), ("whole", [root / "whole.safetensors"])]:
        out = root / f"out-{mode}-{label}"
        run = lora_ga("init", "--rank", 4, "--mode", mode, "--out", out, *inputs)
        assert run.returncode == 0, run.stderr
        check = lora_ga("verify", "--adapter", out, root / "whole.safetensors")
        assert check.returncode == 0, check.stdout + check.stderr
        ratios.append(float(re.search(r"worst: ([0-9.]+)", check.stdout).group(1)))
    assert ratios[0] <= (1.05 if mode == "sketch" else 1.01)
    assert abs(ratios[0] - ratios[1]) < 1e-3, ratios
