#!/usr/bin/env python3
"""write_gradients.py — make a PyTorch job write the gradients lora-ga needs.

WHAT
  LoRA-GA initializes each adapter from the gradient of the loss with respect to the
  frozen weight W [out, in] of every targeted nn.Linear, summed over a few
  micro-batches (the reference implementation uses a few dozen samples).  This
  helper accumulates those gradients in float32 over N micro-batches and writes one
  safetensors file per process:

      OUT/rank{R}/grads.safetensors     tensor "<module name>.weight", shape [out, in]

  with R = torch.distributed rank when a process group is initialized (else $RANK,
  else 0).  lora-ga (or lora-ga-worker) reads any number of such files and sums
  same-named tensors, so ranks, micro-batches and repeated runs all add up.  The
  file's dtype is F32 (default) or BF16/F16; accumulation is always float32.

  Memory: one float32 buffer per targeted weight (4 bytes × parameters), on the
  weight's device or on --buffer-device (e.g. cpu).  On torch ≥ 2.1 each .grad is
  folded into its buffer as soon as it is produced and then freed, so .grad never
  holds more than one layer at a time.

  torch is imported lazily: this file can be imported, and --help runs, without it.

  Things to get right in the training job:
  * Module names must match the base checkpoint (and later the PEFT adapter), so pass
    the plain Hugging Face model (e.g. LlamaForCausalLM → names like
    "model.layers.0.self_attn.q_proj"), not a PeftModel; DDP wrappers are unwrapped.
  * Frozen weights need requires_grad: the recorder turns it on for the weights it
    records (and restores it in close()).
  * DDP averages .grad across ranks during backward; every rank would then write the
    same average.  collect_gradients() runs under ddp_model.no_sync() so each rank
    writes its own local sum; do the same if you drive the loop yourself.
  * FSDP / DeepSpeed ZeRO-3 shard parameters: record on an unsharded model instead.
  * With (reentrant) gradient checkpointing and frozen embeddings, call
    model.enable_input_require_grads() first, or checkpointed layers get no gradient
    (save() warns about layers that got none and writes them as zeros).
  * Sum vs mean, and the loss's own batch averaging, do not change LoRA-GA's singular
    vectors; the metadata records micro_batches so a mean can be taken later.

USAGE (as a library)
  import sys; sys.path.insert(0, "path/to/lora-ga/Scripts")
  from write_gradients import GradientRecorder, collect_gradients

  # simplest: a loop over micro-batches (dicts for model(**batch), output has .loss)
  path = collect_gradients(model, batches, out_dir="grads", include=r"self_attn|mlp",
                           max_batches=32, dtype="f32")

  # or drive it yourself
  with GradientRecorder(model, include=r"\\.(q|k|v|o)_proj$") as recorder:
      for batch in batches:
          model(**batch).loss.backward()
          recorder.step()                      # once per micro-batch, after backward
      recorder.save("grads")                   # → grads/rank{R}/grads.safetensors

USAGE (demo with a Hugging Face model; needs torch and transformers)
  write_gradients.py --model NAME --out DIR [--task causal-lm|masked-lm|seq-cls]
                     [--batches N] [--batch-size B] [--seq-len L] [--text-file FILE]
                     [--include REGEX] [--exclude REGEX] [--dtype f32|bf16|f16]
                     [--device cpu|cuda] [--buffer-device cpu]
  Under torchrun each rank takes every WORLD_SIZE-th text and writes its own file.

EXAMPLE
  python3 Scripts/write_gradients.py --model gpt2 --task causal-lm --out grads --batches 4
  torchrun --nproc-per-node 2 Scripts/write_gradients.py --model bert-base-uncased \\
      --task masked-lm --include 'attention|intermediate|output\\.dense' --out grads
  lora-ga init --rank 8 -o lora-ga-out grads/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys

import numpy as np

# name → (safetensors dtype, torch dtype attribute, numpy dtype with the same bytes)
DTYPES = {
    "f32": ("F32", "float32", "<f4"),
    "bf16": ("BF16", "bfloat16", "<u2"),
    "f16": ("F16", "float16", "<f2"),
}
GRADS_FILE = "grads.safetensors"


def _torch():
    try:
        import torch
    except ImportError:
        sys.exit("write_gradients.py: PyTorch is required here (pip install torch)")
    return torch


# --------------------------------------------------------------------------- safetensors writer (no torch)


def write_safetensors(path, tensors, metadata=None):
    """Streams a safetensors file: the header first, then each tensor as it is produced,
    so only one tensor's bytes are in memory at a time.  Written to a temp file, fsynced
    and renamed, so readers never see a partial file.

    tensors: list of (name, dtype, shape, produce) where dtype is a safetensors dtype
    string (F32, BF16, F16, ...) and produce() returns a C-contiguous little-endian numpy
    array holding exactly prod(shape) elements of that dtype's byte width.
    """
    widths = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, _ in tensors:
        if name in header:
            raise ValueError(f"tensor name '{name}' repeated")
        size = int(np.prod(shape, dtype=np.int64)) * widths[dtype]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape, produce in tensors:
                array = np.ascontiguousarray(produce())
                expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                if array.nbytes != expected:
                    raise ValueError(f"tensor '{name}': produced {array.nbytes} bytes, header says {expected}")
                f.write(array.view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def rank_and_world():
    """(rank, world size): torch.distributed when initialized, else $RANK/$WORLD_SIZE, else (0, 1)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def grads_path(out_dir, rank):
    return os.path.join(out_dir, f"rank{rank}", GRADS_FILE)


# --------------------------------------------------------------------------- recorder


def _unwrap(model):
    torch = _torch()
    kind = type(model).__name__
    if "FullyShardedDataParallel" in kind or hasattr(model, "_fsdp_wrapped_module"):
        raise ValueError("FSDP-sharded models cannot be recorded: weights and gradients are flattened shards; "
                         "record on an unsharded copy")
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module, True
    return model, False


class GradientRecorder:
    """Accumulates the gradient of every selected nn.Linear weight in float32.

    model          the module whose Linear weights to record (DDP is unwrapped; pass the
                   plain HF model, not a PeftModel, so names match the base checkpoint)
    include        regex searched in the module name (e.g. r"self_attn|mlp"); None = all
    exclude        regex of module names to skip (default: lm_head, which LoRA rarely targets)
    dtype          dtype of the written file: "f32" (default), "bf16" or "f16"
    buffer_device  where the float32 sums live (default: each weight's device); "cpu" saves
                   accelerator memory at the cost of a copy per micro-batch
    use_hooks      fold .grad into the sums as soon as it is produced and free it (torch ≥ 2.1;
                   default: when available and the model is not DDP-wrapped); otherwise
                   step() folds every .grad after backward
    enable_grad    turn on requires_grad for the recorded weights (restored by close())
    """

    def __init__(self, model, include=None, exclude=r"(^|\.)lm_head$", dtype="f32", buffer_device=None,
                 use_hooks=None, enable_grad=True):
        torch = _torch()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        inner, wrapped = _unwrap(model)
        include_re = re.compile(include) if include else None
        exclude_re = re.compile(exclude) if exclude else None
        self.layers = []  # (name, module)
        seen = {}
        for name, module in inner.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if include_re and not include_re.search(name):
                continue
            if exclude_re and exclude_re.search(name):
                continue
            if id(module.weight) in seen:  # a tied weight: record it once, under its first name
                print(f"write_gradients: {name}.weight is tied to {seen[id(module.weight)]}.weight; recorded once",
                      file=sys.stderr)
                continue
            seen[id(module.weight)] = name
            self.layers.append((name, module))
        if not self.layers:
            raise ValueError(f"no nn.Linear module matches include={include!r} exclude={exclude!r}")
        names = [n for n, _ in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("two recorded modules share a name")
        self.buffer_device = torch.device(buffer_device) if buffer_device else None
        self.sums = {}
        self.micro_batches = 0
        self._restore = []
        self._handles = []
        if use_hooks is None:
            use_hooks = hasattr(torch.Tensor, "register_post_accumulate_grad_hook") and not wrapped
        self.use_hooks = use_hooks
        for name, module in self.layers:
            weight = module.weight
            if enable_grad and not weight.requires_grad:
                weight.requires_grad_(True)
                self._restore.append(weight)
            if use_hooks:
                self._handles.append(weight.register_post_accumulate_grad_hook(self._hook(name)))

    def _hook(self, name):
        def fold(weight):
            self._fold(name, weight)
        return fold

    def _fold(self, name, weight):
        grad = weight.grad
        if grad is None:
            return
        torch = sys.modules["torch"]
        buffer = self.sums.get(name)
        if buffer is None:
            device = self.buffer_device or grad.device
            buffer = self.sums[name] = torch.zeros(grad.shape, dtype=torch.float32, device=device)
        buffer.add_(grad.detach().to(device=buffer.device, dtype=torch.float32))
        weight.grad = None

    def step(self):
        """Call once after each micro-batch's backward(): folds any .grad left and counts it."""
        if not self.use_hooks:
            for name, module in self.layers:
                self._fold(name, module.weight)
        self.micro_batches += 1

    def save(self, out_dir, rank=None, extra_metadata=None):
        """Writes OUT/rank{R}/grads.safetensors and returns its path.  A layer that never
        received a gradient is written as zeros (every rank must hold the same layers)."""
        torch = sys.modules["torch"]
        if self.micro_batches == 0:
            raise RuntimeError("save() before any step(): call step() after each backward()")
        own_rank, world = rank_and_world()
        rank = own_rank if rank is None else rank
        code, torch_dtype_name, numpy_dtype = DTYPES[self.dtype]
        torch_dtype = getattr(torch, torch_dtype_name)
        missing = [n for n, _ in self.layers if n not in self.sums]
        if missing:
            print(f"write_gradients: warning: {len(missing)} layers got no gradient (written as zeros), e.g. {missing[0]}",
                  file=sys.stderr)

        def producer(name, module):
            def produce():
                buffer = self.sums.get(name)
                if buffer is None:
                    buffer = torch.zeros(module.weight.shape, dtype=torch.float32)
                if not bool(torch.isfinite(buffer).all()):
                    raise FloatingPointError(f"gradient of {name} has NaN or Inf")
                tensor = buffer.detach().to(device="cpu", dtype=torch_dtype).contiguous()
                if self.dtype == "bf16":
                    tensor = tensor.view(torch.int16)
                return tensor.numpy().view(numpy_dtype)
            return produce

        entries = [(name + ".weight", code, tuple(module.weight.shape), producer(name, module))
                   for name, module in self.layers]
        metadata = {"format": "pt", "producer": "lora-ga write_gradients.py", "micro_batches": self.micro_batches,
                    "rank": rank, "world_size": world, "reduction": "sum", "accumulation": "float32",
                    "torch": torch.__version__}
        metadata.update(extra_metadata or {})
        return write_safetensors(grads_path(out_dir, rank), entries, metadata)

    def reset(self):
        self.sums.clear()
        self.micro_batches = 0

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for weight in self._restore:
            weight.requires_grad_(False)
            weight.grad = None
        self._restore.clear()
        self.sums.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def collect_gradients(model, batches, out_dir="grads", loss_fn=None, max_batches=None, rank=None, **recorder_options):
    """Runs forward/backward over `batches` (dicts → model(**batch), else model(batch)),
    records the Linear gradients and writes OUT/rank{R}/grads.safetensors; returns its path.
    loss_fn(output, batch) → loss; default output.loss (Hugging Face models with labels).
    A DDP model runs under no_sync() so each rank sums only its own batches.
    recorder_options go to GradientRecorder (include, exclude, dtype, buffer_device, ...)."""
    torch = _torch()
    import contextlib

    no_sync = model.no_sync if isinstance(model, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext
    with GradientRecorder(model, **recorder_options) as recorder:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            with no_sync():
                output = model(**batch) if isinstance(batch, dict) else model(batch)
                loss = loss_fn(output, batch) if loss_fn else output.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at micro-batch {index}")
                loss.backward()
            recorder.step()
        return recorder.save(out_dir, rank=rank)


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


def demo(args):
    torch = _torch()
    try:
        import transformers
    except ImportError:
        sys.exit("write_gradients.py: the demo needs transformers (pip install transformers)")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = rank_and_world()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_class = {"causal-lm": transformers.AutoModelForCausalLM, "masked-lm": transformers.AutoModelForMaskedLM,
                   "seq-cls": transformers.AutoModelForSequenceClassification}[args.task]
    model = model_class.from_pretrained(args.model).to(device)
    model.train()
    for parameter in model.parameters():  # frozen, as in LoRA; the recorder re-enables the Linear weights
        parameter.requires_grad_(False)

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

    path = collect_gradients(model, batches(), out_dir=args.out, include=args.include, exclude=args.exclude,
                             dtype=args.dtype, buffer_device=args.buffer_device)
    print(f"rank {rank}/{world}: wrote {path}", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="write_gradients.py",
        description="Demo / smoke test: load a Hugging Face model, accumulate the gradients of its nn.Linear "
                    "weights over N micro-batches and write OUT/rank{R}/grads.safetensors for lora-ga. "
                    "Import GradientRecorder / collect_gradients from this file to do the same in your own job.",
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
    parser.add_argument("--include", help="regex: record only nn.Linear modules whose name matches")
    parser.add_argument("--exclude", default=r"(^|\.)lm_head$", help="regex: skip these modules (default: lm_head)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="dtype of the written file (default f32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each torchrun rank uses cuda:LOCAL_RANK)")
    parser.add_argument("--buffer-device", help="where the float32 sums live (default: the weight's device)")
    parser.add_argument("--seed", type=int, default=0, help="seed for masking / labels (default 0)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch_size < 1:
        parser.error("--batches and --batch-size must be positive")
    return args


if __name__ == "__main__":
    demo(parse_args(sys.argv[1:]))
