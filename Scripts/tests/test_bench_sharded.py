"""The bench's sharded jobs on small shapes: `lora-ga-bench shards` and Scripts/bench_sharded.py.

What: the row shards `lora-ga-bench shards` writes hold exactly the whole file's rows, placed by
their "lora_ga.blocks" metadata, in F32 and BF16; the sample file holds the same values; and one
job through the real daemons (lora-ga-coord + 3 lora-ga-worker on 127.0.0.1) reports each
process's CPU, memory and bytes sent, with an adapter whose ratio against the whole file is
≤ 1.01.

Needs LORA_GA_BIN (the directory holding the built lora-ga, lora-ga-bench and the daemons).
Usage:   LORA_GA_BIN=.build/debug python3 -m pytest Scripts/tests/test_bench_sharded.py -q
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BIN = os.environ.get("LORA_GA_BIN")
pytestmark = pytest.mark.skipif(not BIN or not os.path.exists(os.path.join(BIN or "", "lora-ga-bench")),
                                reason="LORA_GA_BIN does not hold a built lora-ga-bench")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shards(out, *args):
    result = subprocess.run([os.path.join(BIN, "lora-ga-bench"), "shards", "--out", str(out), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tensors(path):
    """name → (dtype, shape, raw bytes), and the metadata: read by hand, so BF16 needs no torch."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        data = handle.read()
    metadata = header.pop("__metadata__", {})
    return {name: (t["dtype"], t["shape"], data[t["data_offsets"][0]:t["data_offsets"][1]]) for name, t in header.items()}, metadata


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_row_shards_hold_the_whole_files_rows(tmp_path, dtype):
    summary = shards(tmp_path, "--layer", "a.weight=90x40", "b.weight=7x33", "--row-shards", 1, 3, "--dtype", dtype,
                     "--planted-rank", 16, "--sample", "^b")
    assert summary["layers"] == 2 and summary["parameters"] == 90 * 40 + 7 * 33
    whole, whole_meta = tensors(tmp_path / "rows1" / "w0" / "grads.safetensors")
    assert "lora_ga.blocks" not in whole_meta
    assert all(t[0] == dtype for t in whole.values())
    if dtype == "F32":
        a = np.frombuffer(whole["a.weight"][2], dtype=np.float32).reshape(90, 40)
        assert np.linalg.matrix_rank(a.astype(np.float64), tol=1e-5) == 16
    rebuilt = {name: [None] * t[1][0] for name, t in whole.items()}
    for shard in range(3):
        values, metadata = tensors(tmp_path / "rows3" / f"w{shard}" / "grads.safetensors")
        blocks = json.loads(metadata["lora_ga.blocks"])
        for name, (block_dtype, shape, raw) in values.items():
            row, col = blocks[name]["offset"]
            assert blocks[name]["shape"] == whole[name][1] and col == 0 and block_dtype == dtype
            row_bytes = len(raw) // shape[0]
            for i in range(shape[0]):
                assert rebuilt[name][row + i] is None, "rows of two shards overlap"
                rebuilt[name][row + i] = raw[i * row_bytes:(i + 1) * row_bytes]
    for name, rows in rebuilt.items():
        assert b"".join(rows) == whole[name][2], name
    sample, _ = tensors(tmp_path / "sample" / "grads.safetensors")
    assert list(sample) == ["b.weight"] and sample["b.weight"] == whole["b.weight"]
    assert json.load(open(tmp_path / "rows3" / "planted-spectrum.json"))["layers"]["a.weight"][0] == 1.0


def test_daemon_job_reports_every_process(tmp_path):
    import bench_sharded
    shards(tmp_path / "data", "--layer", "x.weight=300x200", "--row-shards", 1, 3, "--planted-rank", 64)
    job = bench_sharded.run_daemon_job(BIN, [str(tmp_path / "data" / "rows3" / f"w{i}") for i in range(3)],
                                       str(tmp_path / "adapter"), str(tmp_path / "logs"), "job", rank=4, timeout=300)
    assert set(job["processes"]) == {"coordinator", "worker0", "worker1", "worker2"}
    for name, entry in job["processes"].items():
        assert entry["exit"] == 0 and entry["cpu"] > 0 and entry["rss_mb"] > 0, name
        assert entry["bytes"] and entry["bytes"] > 0 and entry["bytes_source"] == "summary-file", name
    sent = sum(job["processes"][f"worker{i}"]["bytes"] for i in range(3))
    assert job["processes"]["coordinator"]["bytes"] == sent
    layers, worst = bench_sharded.verify(os.path.join(BIN, "lora-ga"), str(tmp_path / "adapter"),
                                         [str(tmp_path / "data" / "rows1" / "w0")], str(tmp_path / "verify.txt"))
    assert len(layers) == 1
    assert worst is not None and worst <= 1.01
