"""lora_ga.recorder: record the gradients LoRA-GA needs from a PyTorch job, sharded or not.

LoRA-GA initializes each adapter from G = sum over micro-batches of dL/dW for every
targeted frozen weight W [out, in].  GradientRecorder accumulates those gradients in
float32 and save() writes one safetensors file per process:

    OUT/rank{R}/grads.safetensors     tensor "<module name>.weight"

Each rank keeps and writes only its share of every layer, never a full-size buffer:

  * unsharded model (one process, or DDP without reduce-scatter): the whole layer, as
    before (every rank a partial sum; lora-ga adds the files).
  * FSDP2 (fully_shard): weights and .grad are DTensors sharded on dim 0; the rank
    writes grad.to_local() as a row block at the offset its placement implies.
  * tensor parallel (DTensor weights Shard(0) or Shard(1)): the rank's row or column
    block; 2-D meshes (FSDP2 + TP) give the rank's rectangular block.
  * DDP with reduce_scatter=True: each micro-batch's local gradient is reduce-scattered
    by rows across the process group (the job's own collective sums it), so each rank
    keeps 1/world of the rows of every layer.

A block is a tensor named like the layer whose place is given in the file's metadata
"lora_ga.blocks" (a JSON object): {"<name>.weight": {"shape": [OUT, IN], "offset":
[ROW0, COL0]}}.  A tensor not listed there is a whole layer.  Blocks and whole layers
of one layer add where they overlap, so lora-ga sums files without knowing who wrote
them.  GPT-2-style Conv1D weights (stored [in, out]) are written as [out, in].

Scale: every file holds a sum (metadata "reduction": "sum").  FSDP2 averages gradients
over its data-parallel group by default; the recorder switches its FSDP2 modules to a
plain sum while it records and restores them in close().

Micro-batch counts: "micro_batches" is this rank's own count (step() calls), so summed
over a data-parallel or FSDP2 job's files it gives the job's count, as before;
"micro_batches_total" is the number of micro-batches summed into G itself (this rank's
count times its data-parallel group; tensor-parallel ranks share their batches), the
same in every file of the job: a reader that finds it should use it rather than a sum.

torch is imported lazily: importing this module needs only numpy.
"""

from __future__ import annotations

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
BLOCKS_KEY = "lora_ga.blocks"
LOG_PREFIX = "lora_ga.recorder"


def _torch():
    try:
        import torch
    except ImportError:
        sys.exit(f"{LOG_PREFIX}: PyTorch is required here (pip install torch)")
    return torch


def _log(message):
    print(f"{LOG_PREFIX}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- safetensors writer (no torch)


def safetensors_header(tensors, metadata=None):
    """The header bytes (length prefix excluded) and the total file size of a safetensors
    file holding `tensors` (list of (name, dtype, shape, ...))."""
    widths = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape, *_ in tensors:
        if name in header:
            raise ValueError(f"tensor name '{name}' repeated")
        size = int(np.prod(shape, dtype=np.int64)) * widths[dtype]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return header, blob, 8 + len(blob) + offset


def write_safetensors(path, tensors, metadata=None):
    """Streams a safetensors file: the header first, then each tensor as it is produced,
    so only one tensor's bytes are in memory at a time.  Written to a temp file, fsynced
    and renamed, so readers never see a partial file.

    tensors: list of (name, dtype, shape, produce) where dtype is a safetensors dtype
    string (F32, BF16, F16, ...) and produce() returns a C-contiguous little-endian numpy
    array holding exactly prod(shape) elements of that dtype's byte width.
    """
    header, blob, _ = safetensors_header(tensors, metadata)
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


# --------------------------------------------------------------------------- where a rank's shard lies


def _chunk_bounds(size, chunks, index):
    """[start, end) of chunk `index` when `size` items are cut like torch.chunk (ceil-sized
    chunks, trailing ones short or empty): the rule DTensor's Shard follows."""
    step = -(-size // chunks)
    return min(step * index, size), min(step * (index + 1), size)


def _even_bounds(size, chunks, index):
    """[start, end) of part `index` when `size` rows are split as evenly as possible
    (sizes differ by at most one): the DDP reduce-scatter layout."""
    base, extra = divmod(size, chunks)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _owned_indices(size, dim, mesh_shape, coordinate, placements):
    """Global indices along tensor dimension `dim` that this rank's local shard holds.

    Shard placements apply left to right, as DTensor does: each takes a torch.chunk piece
    of what the previous mesh dimensions left.  A leading _StridedShard(split_factor=s)
    whose s is the number of shards the later mesh dimensions make marks FSDP2 over tensor
    parallelism: FSDP2 chunks the TP-local tensor, so the pieces are cut right to left
    (TP first, then FSDP2), which is what the rank holds even when sizes are uneven.  Any
    other _StridedShard follows DTensor's definition (the same piece of each of s parts)."""
    indices = np.arange(size)
    sharding = [(mesh_dim, placement) for mesh_dim, placement in enumerate(placements)
                if getattr(placement, "dim", None) == dim]
    if not sharding:
        return indices
    first = sharding[0][1]
    later_shards = int(np.prod([mesh_shape[mesh_dim] for mesh_dim, _ in sharding[1:]], dtype=np.int64))
    strided = [p for _, p in sharding if getattr(p, "split_factor", None) is not None]
    if strided == [first] and int(first.split_factor) == later_shards:
        for mesh_dim, _ in reversed(sharding):
            a, b = _chunk_bounds(len(indices), mesh_shape[mesh_dim], coordinate[mesh_dim])
            indices = indices[a:b]
        return indices
    for mesh_dim, placement in sharding:
        chunks, index = mesh_shape[mesh_dim], coordinate[mesh_dim]
        split_factor = getattr(placement, "split_factor", None)
        if split_factor is not None:
            pieces = []
            for part in range(int(split_factor)):
                lo, hi = _chunk_bounds(len(indices), int(split_factor), part)
                sub = indices[lo:hi]
                a, b = _chunk_bounds(len(sub), chunks, index)
                pieces.append(sub[a:b])
            indices = np.concatenate(pieces) if pieces else indices[:0]
        elif placement.is_shard():
            a, b = _chunk_bounds(len(indices), chunks, index)
            indices = indices[a:b]
        else:
            raise ValueError(f"unsupported placement {placement!r}")
    return indices


class Block:
    """Where one rank's share of a layer lies, in the weight's stored orientation.
    shape/offset: the local block; full: the layer's global shape; write: False when
    another rank holds an identical replica and writes it instead."""

    __slots__ = ("full", "shape", "offset", "write")

    def __init__(self, full, shape, offset, write=True):
        self.full, self.shape, self.offset, self.write = tuple(full), tuple(shape), tuple(offset), write

    @property
    def whole(self):
        return self.shape == self.full and self.offset == (0, 0)

    def transposed(self):
        return Block(self.full[::-1], self.shape[::-1], self.offset[::-1], self.write)

    def __eq__(self, other):
        return isinstance(other, Block) and (self.full, self.shape, self.offset, self.write) == (
            other.full, other.shape, other.offset, other.write)

    def __repr__(self):
        return f"Block(full={self.full}, shape={self.shape}, offset={self.offset}, write={self.write})"


def dtensor_block(tensor):
    """The Block that a 2-D DTensor's local shard occupies in the global tensor.
    Shard and _StridedShard placements cut rows or columns; Replicate means identical
    copies (only coordinate 0 on that mesh dimension writes); Partial means partial sums
    (every rank writes: blocks add).  A shard whose rows or columns are not contiguous
    cannot be one block and is refused."""
    spec_shape = tuple(int(d) for d in tensor.shape)
    if len(spec_shape) != 2:
        raise ValueError(f"expected a 2-D weight, got shape {spec_shape}")
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh
        return Block(spec_shape, (0, 0), (0, 0), write=False)
    block = placement_block(spec_shape, tuple(mesh.shape), tuple(coordinate), tuple(tensor.placements))
    local = tuple(int(d) for d in tensor.to_local().shape)
    if local != block.shape:
        raise ValueError(f"local shard has shape {local}, placements {tuple(tensor.placements)} imply {block.shape}")
    return block


def placement_block(spec_shape, mesh_shape, coordinate, placements):
    """The Block held at mesh `coordinate` of a 2-D tensor of global `spec_shape` laid out
    by `placements` over a mesh of `mesh_shape` (see dtensor_block)."""
    shape, offset = [], []
    for dim in range(2):
        owned = _owned_indices(spec_shape[dim], dim, mesh_shape, coordinate, placements)
        if len(owned) and not np.array_equal(owned, np.arange(owned[0], owned[0] + len(owned))):
            raise ValueError(f"placements {placements} give this rank non-contiguous indices along dim {dim}; "
                             "one block per layer and file cannot hold them")
        shape.append(len(owned))
        offset.append(int(owned[0]) if len(owned) else 0)
    write = all(coordinate[d] == 0 for d, p in enumerate(placements) if p.is_replicate())
    return Block(spec_shape, shape, offset, write=write and shape[0] > 0 and shape[1] > 0)


def _cross_check_with_torch(tensor, block):
    """Compares our block with torch's own offset computation where it is available."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return
    if not block.write and not all(block.shape):
        return
    if any(getattr(p, "split_factor", None) is not None for p in tensor.placements):
        return  # FSDP2 over TP: we follow what FSDP2 holds, right to left (see _owned_indices)
    try:
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    except (TypeError, ValueError, RuntimeError):  # a private helper whose signature may change
        return
    if tuple(shape) != block.shape or (all(shape) and tuple(offset) != block.offset):
        raise AssertionError(f"block {block} disagrees with torch: shape {tuple(shape)} offset {tuple(offset)}")


# --------------------------------------------------------------------------- recorder


def _is_dtensor(tensor):
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _is_conv1d(module):
    """GPT-2-style Conv1D (transformers.pytorch_utils.Conv1D): a linear map whose weight
    is stored [in, out] (nx, nf)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _refuse_unsupported(model):
    """Sharding schemes whose gradients are not DTensors: say what to use instead."""
    for name, parameter in model.named_parameters():
        if any(hasattr(parameter, attribute) for attribute in ("ds_id", "ds_status", "ds_tensor")):
            raise ValueError(
                f"{name} is partitioned by DeepSpeed ZeRO-3: its gradient partitions are flat slices of the "
                "flattened parameter kept by DeepSpeed's engine, not tensors of the layer's shape, and are not "
                "recorded.  Record under PyTorch FSDP2 (fully_shard) instead, whose row shards are written as "
                "blocks, or on a data-parallel (DDP) copy with GradientRecorder(..., reduce_scatter=True) so each "
                "rank keeps 1/world of every layer.")
    kind = type(model).__name__
    if kind == "FullyShardedDataParallel" or hasattr(model, "_fsdp_wrapped_module") or any(
            type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) flattens weights and gradients into flat shards that are not "
            "blocks of a layer.  Shard with FSDP2 (torch.distributed.fsdp.fully_shard), whose gradients are "
            "row-sharded DTensors the recorder writes as blocks, or use DDP with reduce_scatter=True.")


def _unwrap(model):
    torch = _torch()
    _refuse_unsupported(model)
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module, True
    return model, False


def _fsdp2_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_param_groups(module):
    """FSDP2's parameter groups of one fully_shard-ed module (private torch state; empty
    when this torch keeps it elsewhere)."""
    try:
        state = module._get_fsdp_state()
    except (AttributeError, TypeError):
        return []
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch 2.4-2.5 keep one group per module
        groups = [getattr(state, "_fsdp_param_group", None)]
    return [group for group in groups if group is not None]


class _Layer:
    """One recorded weight: its name, module, parameter, orientation and this rank's block."""

    __slots__ = ("name", "module", "weight", "transposed", "block")

    def __init__(self, name, module, transposed):
        self.name, self.module, self.weight, self.transposed = name, module, module.weight, transposed
        self.block = None


class GradientRecorder:
    """Accumulates, in float32, this rank's share of the gradient of every selected
    nn.Linear (and GPT-2 Conv1D) weight.

    model          the module whose weights to record (DDP is unwrapped; pass the plain HF
                   model, not a PeftModel, so names match the base checkpoint).  May be
                   sharded with FSDP2 (fully_shard) and/or tensor parallelism (DTensor weights).
    include        regex searched in the module name (e.g. r"self_attn|mlp"); None = all
    exclude        regex of module names to skip (default: lm_head, which LoRA rarely targets)
    dtype          dtype of the written file: "f32" (default), "bf16" or "f16"
    buffer_device  where the float32 sums live (default: each gradient's device); "cpu" saves
                   accelerator memory at the cost of a copy per micro-batch
    use_hooks      fold .grad into the sums as soon as it is produced and free it (torch ≥ 2.1;
                   default: when available and neither DDP-wrapped nor FSDP2-sharded, whose
                   gradients appear after backward); otherwise step() folds every .grad
    enable_grad    turn on requires_grad for the recorded weights (restored by close())
    reduce_scatter for data-parallel jobs (plain tensors on every rank): step() reduce-scatters
                   each layer's local gradient by rows over `group`, so each rank keeps and
                   writes 1/world of every layer's rows, summed over all ranks.  step() is then a
                   collective: every rank calls it equally often (as FSDP2's backward already is)
    group          process group for reduce_scatter (default: the world)
    fsdp_sum       switch FSDP2 modules to sum (not average) their gradient reduction while
                   recording, so files hold sums like every other layout (default True)
    """

    def __init__(self, model, include=None, exclude=r"(^|\.)lm_head$", dtype="f32", buffer_device=None,
                 use_hooks=None, enable_grad=True, reduce_scatter=False, group=None, fsdp_sum=True):
        torch = _torch()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.dtype = dtype
        inner, wrapped = _unwrap(model)
        include_re = re.compile(include) if include else None
        exclude_re = re.compile(exclude) if exclude else None
        self.layers = []
        seen = {}
        for name, module in inner.named_modules():
            conv1d = _is_conv1d(module)
            if not (isinstance(module, torch.nn.Linear) or conv1d):
                continue
            if include_re and not include_re.search(name):
                continue
            if exclude_re and exclude_re.search(name):
                continue
            if id(module.weight) in seen:  # a tied weight: record it once, under its first name
                _log(f"{name}.weight is tied to {seen[id(module.weight)]}.weight; recorded once")
                continue
            seen[id(module.weight)] = name
            self.layers.append(_Layer(name, module, transposed=conv1d))
        if not self.layers:
            raise ValueError(f"no nn.Linear or Conv1D module matches include={include!r} exclude={exclude!r}")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("two recorded modules share a name")

        self.reduce_scatter = bool(reduce_scatter)
        self.group = group
        distributed = [layer.name for layer in self.layers if _is_dtensor(layer.weight)]
        plain = [layer.name for layer in self.layers if not _is_dtensor(layer.weight)]
        self.sharded = bool(distributed)
        if distributed and plain:
            # Under tensor parallelism a plain weight is a replica every rank computes alike;
            # under data parallelism it is a partial sum: the recorder cannot tell which.
            raise ValueError(f"{plain[0]}.weight is a plain tensor while {distributed[0]}.weight is a DTensor: "
                             "record the sharded layers only (include/exclude), or distribute the others too")
        if self.reduce_scatter:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("reduce_scatter=True needs an initialized torch.distributed process group")
            if self.sharded:
                raise ValueError("reduce_scatter=True is for data-parallel jobs whose weights are whole on every "
                                 "rank; FSDP2 / tensor-parallel gradients are already sharded and are written as "
                                 "blocks without it")
        self.buffer_device = torch.device(buffer_device) if buffer_device else None
        self.sums = {}
        self.micro_batches = 0
        self.report = None
        self._restore = []
        self._handles = []
        self._fsdp_restore = []
        self.fsdp_summed = False
        self.fsdp_modules = _fsdp2_modules(inner)
        if self.fsdp_modules and fsdp_sum:
            self._fsdp_use_sum()
        for layer in self.layers:
            if enable_grad and not layer.weight.requires_grad:
                layer.weight.requires_grad_(True)
                self._restore.append(layer.weight)
            layer.block = self._initial_block(layer)
        if use_hooks is None:
            use_hooks = (hasattr(torch.Tensor, "register_post_accumulate_grad_hook") and not wrapped
                         and not self.fsdp_modules and not self.reduce_scatter)
        if use_hooks and self.reduce_scatter:
            raise ValueError("reduce_scatter=True folds in step() (a collective in a fixed layer order); "
                             "use_hooks must be False")
        self.use_hooks = use_hooks
        if use_hooks:
            for layer in self.layers:
                self._handles.append(layer.weight.register_post_accumulate_grad_hook(self._hook(layer)))

    # ----------------------------------------------------------------- layout

    def _initial_block(self, layer):
        weight = layer.weight
        full = tuple(int(d) for d in weight.shape)
        if _is_dtensor(weight):
            block = dtensor_block(weight)
            _cross_check_with_torch(weight, block)
            return block
        if self.reduce_scatter:
            rank = torch_rank(self.group)
            world = torch_world(self.group)
            start, end = _even_bounds(full[0], world, rank)
            return Block(full, (end - start, full[1]), (start, 0), write=end > start)
        return Block(full, full, (0, 0))

    def _fsdp_use_sum(self):
        """FSDP2 divides gradients by its data-parallel size by default; a factor of 1 with
        sum-only collectives makes the reduce-scatter a plain sum (gloo has no PREMUL_SUM)."""
        for module in self.fsdp_modules:
            if not hasattr(module, "set_gradient_divide_factor"):
                _log("this torch's FSDP2 cannot be switched to sum: files hold its default average")
                return
        for module in self.fsdp_modules:
            for group in _fsdp_param_groups(module):
                self._fsdp_restore.append((group, getattr(group, "gradient_divide_factor", None),
                                           getattr(group, "force_sum_reduction_for_comms", None)))
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
        self.fsdp_summed = True

    # ----------------------------------------------------------------- accumulation

    def _hook(self, layer):
        def fold(weight):
            self._fold(layer)
        return fold

    def _buffer(self, layer, like):
        torch = sys.modules["torch"]
        buffer = self.sums.get(layer.name)
        if buffer is None:
            device = self.buffer_device or like.device
            buffer = self.sums[layer.name] = torch.zeros(layer.block.shape, dtype=torch.float32, device=device)
        return buffer

    def _fold(self, layer):
        weight = layer.weight
        grad = weight.grad
        if grad is None:
            return
        torch = sys.modules["torch"]
        if _is_dtensor(grad):
            block = dtensor_block(grad)
            if block != layer.block:
                raise ValueError(f"{layer.name}: gradient placements {tuple(grad.placements)} give {block}, "
                                 f"the weight's give {layer.block}")
            local = grad.to_local()
        else:
            local = grad
        if tuple(local.shape) != layer.block.shape:
            raise ValueError(f"{layer.name}: gradient shape {tuple(local.shape)} is not the expected {layer.block.shape}")
        buffer = self._buffer(layer, local)
        buffer.add_(local.detach().to(device=buffer.device, dtype=torch.float32))
        weight.grad = None

    def _fold_reduce_scatter(self, layer):
        """Sums this layer's local gradients over the group and keeps this rank's rows.
        Every rank calls it for every layer in the same order (a missing .grad counts as zeros)."""
        torch = sys.modules["torch"]
        dist = torch.distributed
        world, rank = torch_world(self.group), torch_rank(self.group)
        weight = layer.weight
        grad = weight.grad
        if grad is None:
            grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad = grad.detach().to(torch.float32).contiguous()
        rows = [_even_bounds(grad.shape[0], world, r) for r in range(world)]
        pieces = [grad[a:b] for a, b in rows]
        received = torch.empty_like(pieces[rank])
        dist.reduce_scatter(received, pieces, op=dist.ReduceOp.SUM, group=self.group)
        buffer = self._buffer(layer, received)
        buffer.add_(received.to(buffer.device))
        weight.grad = None

    def step(self):
        """Call once after each micro-batch's backward(): folds any .grad left and counts it."""
        if self.reduce_scatter:
            for layer in self.layers:
                self._fold_reduce_scatter(layer)
        elif not self.use_hooks:
            for layer in self.layers:
                self._fold(layer)
        self.micro_batches += 1

    # ----------------------------------------------------------------- output

    def buffer_bytes(self):
        """Bytes of this rank's float32 accumulation buffers (allocated so far)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.sums.values())

    def _group_size(self):
        """How many ranks' micro-batches a collective summed into this rank's blocks."""
        if self.reduce_scatter:
            return torch_world(self.group)
        if self.fsdp_modules:
            sizes = set()
            for module in self.fsdp_modules:
                for group in _fsdp_param_groups(module):
                    mesh_info = getattr(group, "mesh_info", None)
                    shard = getattr(mesh_info, "shard_mesh_size", None)
                    if shard is not None:
                        sizes.add(int(shard) * int(getattr(mesh_info, "replicate_mesh_size", 1) or 1))
            if sizes:
                return max(sizes)
            _log("cannot read FSDP2's data-parallel size: micro_batches_total counts this rank's only")
        return 1

    def save(self, out_dir, rank=None, extra_metadata=None):
        """Writes OUT/rank{R}/grads.safetensors holding this rank's share of every layer and
        returns its path.  A layer that never received a gradient is written as zeros (its
        share of them), so every layer stays covered.  This rank's buffer bytes and file
        bytes are logged and kept in self.report; the buffer bytes also go to the metadata."""
        torch = sys.modules["torch"]
        if self.micro_batches == 0:
            raise RuntimeError("save() before any step(): call step() after each backward()")
        own_rank, world = rank_and_world()
        rank = own_rank if rank is None else rank
        code, torch_dtype_name, numpy_dtype = DTYPES[self.dtype]
        torch_dtype = getattr(torch, torch_dtype_name)
        missing = [layer.name for layer in self.layers if layer.name not in self.sums and layer.block.write]
        if missing:
            _log(f"warning: {len(missing)} layers got no gradient (written as zeros), e.g. {missing[0]}")

        def producer(layer):
            def produce():
                buffer = self.sums.get(layer.name)
                if buffer is None:
                    buffer = torch.zeros(layer.block.shape, dtype=torch.float32)
                if not bool(torch.isfinite(buffer).all()):
                    raise FloatingPointError(f"gradient of {layer.name} has NaN or Inf")
                tensor = buffer.detach()
                if layer.transposed:
                    tensor = tensor.t()
                tensor = tensor.to(device="cpu", dtype=torch_dtype).contiguous()
                if self.dtype == "bf16":
                    tensor = tensor.view(torch.int16)
                return tensor.numpy().view(numpy_dtype)
            return produce

        entries, blocks, block_count = [], {}, 0
        for layer in self.layers:
            if not layer.block.write:
                continue
            block = layer.block.transposed() if layer.transposed else layer.block
            name = layer.name + ".weight"
            entries.append((name, code, block.shape, producer(layer)))
            if not block.whole:
                blocks[name] = {"shape": list(block.full), "offset": list(block.offset)}
                block_count += 1
        group = self._group_size()
        buffer_bytes = self.buffer_bytes()
        metadata = {"format": "pt", "producer": "lora-ga lora_ga.recorder", "micro_batches": self.micro_batches,
                    "micro_batches_total": self.micro_batches * group, "rank": rank, "world_size": world,
                    "reduction": "sum" if (not self.fsdp_modules or self.fsdp_summed) else "mean",
                    "accumulation": "float32", "torch": torch.__version__, "buffer_bytes": buffer_bytes,
                    "layout": self.layout}
        if blocks or self.sharded or self.reduce_scatter:
            # Present (even as "{}") in every file of a sharded recording: readers then check
            # coverage instead of requiring every file to hold every layer, since a rank whose
            # share of a layer is empty, or a replica, leaves that layer out.
            metadata[BLOCKS_KEY] = json.dumps(blocks, separators=(",", ":"), sort_keys=True)
        metadata.update(extra_metadata or {})
        _, _, file_bytes = safetensors_header(entries, metadata)
        path = write_safetensors(grads_path(out_dir, rank), entries, metadata)
        full_bytes = sum(4 * layer.block.full[0] * layer.block.full[1] for layer in self.layers)
        self.report = {"rank": rank, "path": path, "layers": len(entries), "blocks": block_count,
                       "buffer_bytes": buffer_bytes, "file_bytes": file_bytes, "full_float32_bytes": full_bytes,
                       "layout": self.layout}
        _log(f"rank {rank}/{world}: {self.layout}: {len(entries)} layers ({block_count} as blocks), "
             f"buffers {buffer_bytes / 2**20:.2f} MiB ({buffer_bytes / max(full_bytes, 1):.3f} of the unsharded "
             f"{full_bytes / 2**20:.2f} MiB), file {file_bytes / 2**20:.2f} MiB: {path}")
        return path

    @property
    def layout(self):
        if self.reduce_scatter:
            return "ddp-reduce-scatter"
        if self.fsdp_modules and any(len(layer.weight.device_mesh.shape) > 1 for layer in self.layers
                                     if _is_dtensor(layer.weight)):
            return "fsdp2+tp"
        if self.fsdp_modules:
            return "fsdp2"
        if self.sharded:
            return "dtensor"
        return "whole"

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
        for group, factor, force_sum in self._fsdp_restore:
            group.gradient_divide_factor = factor
            if force_sum is not None:
                group.force_sum_reduction_for_comms = force_sum
        self._fsdp_restore.clear()
        self.fsdp_summed = False
        self.sums.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def torch_rank(group=None):
    return sys.modules["torch"].distributed.get_rank(group)


def torch_world(group=None):
    return sys.modules["torch"].distributed.get_world_size(group)


def collect_gradients(model, batches, out_dir="grads", loss_fn=None, max_batches=None, rank=None, **recorder_options):
    """Runs forward/backward over `batches` (dicts → model(**batch), else model(batch)),
    records the gradients and writes OUT/rank{R}/grads.safetensors; returns its path.
    loss_fn(output, batch) → loss; default output.loss (Hugging Face models with labels).
    A DDP model runs under no_sync() so each rank sums only its own batches (or, with
    reduce_scatter=True, the recorder sums them by rows).
    recorder_options go to GradientRecorder (include, exclude, dtype, reduce_scatter, ...)."""
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
