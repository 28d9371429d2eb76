"""write_gradients.py — make a PyTorch job write the gradients lora-ga needs.

WHAT
  LoRA-GA initializes each adapter from the gradient of the loss with respect to the
  frozen weight W [out, in] of every targeted nn.Linear (and GPT-2 Conv1D, written as
  [out, in]), summed over a few micro-batches.  The recorder (lora_ga.recorder, in
  Scripts/python) accumulates those gradients in float32 over N micro-batches and writes
  one safetensors file per process:

      OUT/rank{R}/grads.safetensors     tensor "<module name>.weight"

  with R = torch.distributed rank when a process group is initialized (else $RANK,
  else 0).  lora-ga (or lora-ga-worker) reads any number of such files and adds them,
  so ranks, micro-batches and repeated runs all add up.  The file's dtype is F32
  (default) or BF16/F16; accumulation is always float32.

  Sharded training: each rank keeps and writes only its share of every layer, as a
  block (a tensor named like the layer, placed by the metadata "lora_ga.blocks"):
  FSDP2 (fully_shard) row shards, tensor-parallel row or column shards (DTensor
  weights), and for DDP an option (--layout ddp-reduce-scatter, or
  GradientRecorder(..., reduce_scatter=True)) that reduce-scatters each layer's
  gradient by rows so each rank keeps 1/world of it.  DeepSpeed ZeRO-3 and FSDP1 are
  refused with a message naming these instead.  Each rank logs its buffer memory and
  file size.

  Memory: one float32 buffer per targeted weight share (4 bytes × the rank's share of
  the parameters), on the gradient's device or on --buffer-device (e.g. cpu).

  torch is imported lazily: this file can be imported, and --help runs, without it.

  Things to get right in the training job:
  * Module names must match the base checkpoint (and later the PEFT adapter), so pass
    the plain Hugging Face model, not a PeftModel; DDP wrappers are unwrapped.
  * Frozen weights need requires_grad: the recorder turns it on for the weights it
    records (and restores it in close()).
  * DDP averages .grad across ranks during backward; collect_gradients() runs under
    ddp_model.no_sync() so each rank writes its own local sum (or, with reduce-scatter,
    the recorder sums by rows); do the same if you drive the loop yourself.
  * FSDP2 averages gradients over its group by default; the recorder switches it to a
    sum while recording, so every layout's files hold sums.
  * With (reentrant) gradient checkpointing and frozen embeddings, call
    model.enable_input_require_grads() first, or checkpointed layers get no gradient
    (save() warns about layers that got none and writes them as zeros).
  * Sum vs mean does not change LoRA-GA's singular vectors; the metadata records
    micro_batches (this rank's count) and micro_batches_total (the micro-batches summed
    into the whole gradient) so a mean can be taken.

USAGE (as a library)
  import sys; sys.path.insert(0, "path/to/lora-ga/Scripts/python")   # or pip install Scripts/python
  from lora_ga.recorder import GradientRecorder, collect_gradients

  # simplest: a loop over micro-batches (dicts for model(**batch), output has .loss)
  path = collect_gradients(model, batches, out_dir="grads", include=r"self_attn|mlp",
                           max_batches=32, dtype="f32")

  # or drive it yourself (the model may be fully_shard-ed or tensor-parallel)
  with GradientRecorder(model, include=r"\\.(q|k|v|o)_proj$") as recorder:
      for batch in batches:
          model(**batch).loss.backward()
          recorder.step()                      # once per micro-batch, after backward
      recorder.save("grads")                   # → grads/rank{R}/grads.safetensors

  `from write_gradients import GradientRecorder, collect_gradients` (with Scripts on
  sys.path) still works: this file re-exports them.

USAGE (demo with a Hugging Face model; needs torch and transformers)
  write_gradients.py --model NAME --out DIR [--task causal-lm|masked-lm|seq-cls]
                     [--batches N] [--batch-size B] [--seq-len L] [--text-file FILE]
                     [--include REGEX] [--exclude REGEX] [--dtype f32|bf16|f16]
                     [--layout whole|fsdp2|ddp-reduce-scatter]
                     [--device cpu|cuda] [--buffer-device cpu]
  Under torchrun each rank takes every WORLD_SIZE-th text and writes its own file.

EXAMPLE
  python3 Scripts/write_gradients.py --model gpt2 --task causal-lm --out grads --batches 4
  torchrun --nproc-per-node 2 Scripts/write_gradients.py --model bert-base-uncased \\
      --task masked-lm --include 'attention|intermediate|output\\.dense' --layout fsdp2 --out grads
  lora-ga init --rank 8 -o lora-ga-out grads/
"""

from __future__ import annotations

import argparse
import os
import sys

# The recorder lives in the lora_ga package beside this script (Scripts/python), so a
# checkout runs without installing anything.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))

from lora_ga.recorder import (  # noqa: E402  (re-exported for existing users)
    BLOCKS_KEY, DTYPES, GRADS_FILE, GradientRecorder, _torch, collect_gradients, grads_path, rank_and_world,
    write_safetensors)

__all__ = ["BLOCKS_KEY", "DTYPES", "GRADS_FILE", "GradientRecorder", "collect_gradients", "grads_path",
           "rank_and_world", "write_safetensors"]


# --------------------------------------------------------------------------- demo


DEMO_TEXTS = [
    "LoRA-GA aligns the first step of low-rank adaptation with full fine-tuning.",
    "The gradient of each frozen weight is summed over a few micro-batches.",
    "A randomized SVD finds the top singular directions without forming the whole matrix.",
    "Workers stream row blocks of their gradients to a coordinator over TCP.",
    "The coordinator writes a PEFT adapter once every layer is finished.",
    "Before training, the frozen weights are offset so the model is unchanged at step zero.",
    "Small batches of ordinary text are enough to estimate the gradient directions.",
    "Every layer is processed in turn so memory stays flat however deep the model is.",
]


def shard_fsdp2(model):
    """fully_shard every element of the model's layer lists (transformer blocks), then the
    root: the usual FSDP2 wrapping, so no rank ever holds more than one block unsharded."""
    torch = _torch()
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def demo(args):
    torch = _torch()
    try:
        import transformers
    except ImportError:
        sys.exit("write_gradients.py: the demo needs transformers (pip install transformers)")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.layout != "whole" and world < 2:
        sys.exit(f"write_gradients.py: --layout {args.layout} needs several ranks (start it with torchrun)")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = rank_and_world()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # weights the checkpoint lacks (a new head) start alike on every rank

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_class = {"causal-lm": transformers.AutoModelForCausalLM, "masked-lm": transformers.AutoModelForMaskedLM,
                   "seq-cls": transformers.AutoModelForSequenceClassification}[args.task]
    model = model_class.from_pretrained(args.model).to(device)
    model.train()
    for parameter in model.parameters():  # frozen, as in LoRA; the recorder re-enables the Linear weights
        parameter.requires_grad_(False)
    torch.manual_seed(args.seed + rank)  # masks and labels differ between ranks

    if args.text_file:
        with open(args.text_file) as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        texts = DEMO_TEXTS
    texts = texts[rank::world] or texts

    def batches():
        for index in range(args.batches):
            chunk = [texts[(index * args.batch_size + j) % len(texts)] for j in range(args.batch_size)]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=args.seq_len)
            encoded = {k: v.to(device) for k, v in encoded.items()}
            if args.task == "causal-lm":
                labels = encoded["input_ids"].clone()
                labels[encoded["attention_mask"] == 0] = -100
            elif args.task == "masked-lm":
                labels = encoded["input_ids"].clone()
                mask = (torch.rand(labels.shape, device=device) < 0.15) & (encoded["attention_mask"] == 1)
                mask[:, 0] |= ~mask.any(dim=1)  # at least one masked token per row
                labels[~mask] = -100
                encoded["input_ids"] = encoded["input_ids"].masked_fill(mask, tokenizer.mask_token_id)
            else:
                labels = torch.randint(0, model.config.num_labels, (len(chunk),), device=device)
            encoded["labels"] = labels
            yield encoded

    if args.layout == "fsdp2":
        shard_fsdp2(model)
    path = collect_gradients(model, batches(), out_dir=args.out, include=args.include, exclude=args.exclude,
                             dtype=args.dtype, buffer_device=args.buffer_device,
                             reduce_scatter=args.layout == "ddp-reduce-scatter")
    print(f"rank {rank}/{world}: wrote {path}", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="write_gradients.py",
        description="Demo / smoke test: load a Hugging Face model, accumulate the gradients of its nn.Linear "
                    "(and GPT-2 Conv1D) weights over N micro-batches and write OUT/rank{R}/grads.safetensors "
                    "for lora-ga (under torchrun: each rank its share, as blocks with --layout). "
                    "Import GradientRecorder / collect_gradients from lora_ga.recorder to do the same in your own job.",
        epilog="Example: write_gradients.py --model gpt2 --task causal-lm --out grads --batches 4; "
               "then: lora-ga init --rank 8 -o lora-ga-out grads/")
    parser.add_argument("--model", required=True, help="Hugging Face model name or local path")
    parser.add_argument("--out", required=True, help="output directory (rank{R}/grads.safetensors is written in it)")
    parser.add_argument("--task", choices=["causal-lm", "masked-lm", "seq-cls"], default="causal-lm",
                        help="which head and loss to use (default causal-lm)")
    parser.add_argument("--batches", type=int, default=8, help="micro-batches per rank (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per micro-batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="maximum tokens per text (default 128)")
    parser.add_argument("--text-file", help="one training text per line (default: a few built-in sentences)")
    parser.add_argument("--include", help="regex: record only nn.Linear / Conv1D modules whose name matches")
    parser.add_argument("--exclude", default=r"(^|\.)lm_head$", help="regex: skip these modules (default: lm_head)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="dtype of the written file (default f32)")
    parser.add_argument("--layout", choices=["whole", "fsdp2", "ddp-reduce-scatter"], default="whole",
                        help="whole: every rank writes whole layers (its local sum); fsdp2: shard the model with "
                             "fully_shard and write each rank's row blocks; ddp-reduce-scatter: reduce-scatter each "
                             "layer by rows so each rank writes 1/world of it (default whole)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun rank uses cuda:LOCAL_RANK)")
    parser.add_argument("--buffer-device", help="where the float32 sums live (default: the weight's device)")
    parser.add_argument("--seed", type=int, default=0, help="seed for masking / labels (default 0)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1:
        parser.error("--batches and --batch-size must be positive")
    return args


if __name__ == "__main__":
    demo(parse_args(sys.argv[1:]))
