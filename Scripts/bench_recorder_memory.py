#!/usr/bin/env python3
"""bench_recorder_memory.py: what recording LoRA-GA gradients costs each rank, by layout.

What: builds a stack of LAYERS square nn.Linear layers (SIZE × SIZE, float32, frozen),
records their gradient over a few micro-batches with lora_ga.recorder and reports, per
rank: the recorder's float32 buffers, the file it wrote, and the process's peak resident
memory above what it held before the model existed (ru_maxrss; model, gradients,
activations and collectives included; MALLOC_MMAP_THRESHOLD_=131072 so that freed
memory leaves the process).  Layouts, side by side in one run:
  whole        one process, unsharded (what every rank holds without sharding)
  fsdp2        WORLD ranks, each layer fully_shard-ed (row blocks)
  ddp-rs       WORLD ranks, whole weights, the recorder's row reduce-scatter
CPU, gloo on a loopback port.  Prints a Markdown table.

Reading it: the recorder's own memory is its buffers, which follow the rank's share
exactly.  The process peak also holds the job's weights and .grad (FSDP2: its shards, plus
per-layer all-gather and reduce-scatter transients; DDP: whole weights and local .grad) and
is the framework's, not the recorder's.

Usage:   bench_recorder_memory.py [--layers N] [--size S] [--world W] [--batches B]
Example: ~/.cache/lora-ga/venv/bin/python Scripts/bench_recorder_memory.py --layers 8 --size 2048 --world 2
"""

import argparse
import json
import os
import resource
import socket
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(layers, size):
    import torch

    torch.manual_seed(0)  # weights' values do not matter here, only their memory
    model = torch.nn.Sequential(*[torch.nn.Linear(size, size, bias=False) for _ in range(layers)])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batches(rank, world, count, size):
    import torch

    for index in range(rank, count, world):
        yield torch.randn(4, size, generator=torch.Generator().manual_seed(index))


def record(layout, rank, world, args, out):
    import torch
    from torch.distributed.fsdp import fully_shard  # imported before the baseline in every layout

    from lora_ga.recorder import GradientRecorder

    baseline = current_mib()
    options = {}
    if layout == "fsdp2":
        # The FSDP2 recipe for big models: build on the meta device, shard, then allocate
        # and initialize only this rank's shards.
        with torch.device("meta"):
            model = build(args.layers, args.size)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():  # each rank fills its own shard (values do not matter here)
            for parameter in model.parameters():
                parameter.to_local().uniform_(-0.02, 0.02)
    else:
        model = build(args.layers, args.size)
    if layout == "ddp-rs":
        options["reduce_scatter"] = True
    with GradientRecorder(model, exclude=None, **options) as recorder:
        for batch in batches(rank, world, args.batches, args.size):
            (model(batch) ** 2).sum().backward()
            recorder.step()
        recorder.save(out, rank=rank)
        report = dict(recorder.report)
    report.update(layout=layout, rank=rank, world=world, peak_above_baseline_mib=peak_mib() - baseline)
    with open(os.path.join(out, f"bench{rank}.json"), "w") as f:
        json.dump(report, f)


def rank_main(rank, world, port, layout, args, out):
    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    record(layout, rank, world, args, out)
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="global micro-batches (a multiple of --world)")
    args = parser.parse_args()
    if args.batches % args.world:
        parser.error("--batches must be a multiple of --world (every rank runs as many)")
    # glibc raises its mmap threshold after large frees and then keeps freed layers in its
    # heap, which would count as resident; a fixed threshold makes RSS follow live memory.
    # Read at process start: the spawned ranks get it.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for layout in ("whole", "fsdp2", "ddp-rs"):
            out = os.path.join(scratch, layout)
            os.makedirs(out)
            if layout == "whole":
                # a fresh process too, so its peak is its own
                torch.multiprocessing.spawn(record_whole, args=(args, out), nprocs=1)
                world = 1
            else:
                world = args.world
                torch.multiprocessing.spawn(rank_main, args=(world, free_port(), layout, args, out), nprocs=world)
            for rank in range(world):
                with open(os.path.join(out, f"bench{rank}.json")) as f:
                    rows.append(json.load(f))
    full = rows[0]["full_float32_bytes"] / 2**20
    print(f"{args.layers} × Linear {args.size}×{args.size} (float32 gradient {full:.0f} MiB), "
          f"{args.batches} micro-batches, CPU/gloo, MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}")
    print("| layout | rank | recorder buffers MiB | file MiB | peak RSS above baseline MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['rank']}/{row['world']} | {row['buffer_bytes'] / 2**20:.1f} | "
              f"{row['file_bytes'] / 2**20:.1f} | {row['peak_above_baseline_mib']:.0f} |")


def record_whole(rank, args, out):
    import torch

    torch.set_num_threads(1)
    record("whole", 0, 1, args, out)


if __name__ == "__main__":
    main()
