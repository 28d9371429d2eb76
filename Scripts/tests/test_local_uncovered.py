"""`lora-ga local` and `lora-ga-coord` on blocks that leave part of a layer uncovered.

What: two workers' directories whose blocks leave rows 60..<96 × cols 50..<80 of a 96×80
layer uncovered. `lora-ga local` refuses the set (naming the layer and the rectangle) and
accepts it with --allow-uncovered, which it passes on to its coordinator (the coordinator
would otherwise refuse the workers' announcements); the daemons then treat the hole as zeros
in every mode. `lora-ga-coord --help` lists the flag with its environment variable.

Needs LORA_GA_BIN (the directory holding the built lora-ga and daemons; Scripts/test sets it).
Usage:   LORA_GA_BIN=.build/debug python3 -m pytest Scripts/tests/test_local_uncovered.py -q
"""

import os
import subprocess

import pytest

from test_cli_blocks import BIN, sharded  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not BIN or not os.path.exists(os.path.join(BIN or "", "lora-ga-coord")),
                                reason="LORA_GA_BIN does not hold the built daemons")


def run(name, *args):
    return subprocess.run([os.path.join(BIN, name), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["dense", "sketch", "power"])
def test_local_refuses_a_hole_and_accepts_it_with_the_flag(sharded, mode):  # noqa: F811
    root, _ = sharded
    dirs = [root / "a", root / "b"]
    refused = run("lora-ga", "local", "--workers", 2, "--rank", 2, "--mode", mode, "--out", root / "refused", *dirs)
    assert refused.returncode != 0
    assert "layer 'x.weight'" in refused.stderr and "rows 60..<96, cols 50..<80" in refused.stderr, refused.stderr
    out = root / f"out-{mode}"
    accepted = run("lora-ga", "local", "--workers", 2, "--rank", 2, "--mode", mode, "--allow-uncovered", "--out", out, *dirs)
    assert accepted.returncode == 0, accepted.stderr
    assert (out / "adapter_model.safetensors").exists()


def test_coordinator_help_lists_the_flag():
    text = run("lora-ga-coord", "--help").stdout
    assert "--allow-uncovered" in text and "LORA_GA_ALLOW_UNCOVERED" in text
