"""Train a lora-ga adapter with PEFT without writing an offset copy of the base model.

LoRA-GA factors (A0, B0) are not zero, so a model that simply loads them computes
W + s·B0·A0 at step 0.  `attach` returns a trainable PeftModel whose function at step 0 is
the base model's, in one of two ways (DESIGN.md §2c):

  offset="adapter"  (default) a frozen second adapter (A0, −B0), active beside the trainable
                    one, cancels s·B0·A0.  The base weights are never touched, so this works
                    for quantized bases and bases sharded before attach.  Cost: one more
                    rank-r product per adapted layer in every forward pass.
  offset="weights"  W ← W − s·B0·A0 in memory, computed in float32 and cast once to W's
                    dtype (under FSDP2 each rank changes only its own rows of a DTensor).
                    No extra compute; in BF16 part of the offset rounds away.

An adapter whose method needs no offset (LoRA-One) is attached as it is.

After training, `save_converted` writes one plain PEFT LoRA adapter (rank 2r) that reproduces
the trained model on the unmodified base (see lora_ga.convert).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .convert import convert
from .peft_safetensors import METHOD_KEY, AdapterError, factor_pairs, method_of, needs_offset, read_adapter, write_adapter

OFFSET_ADAPTER = "lora_ga_offset"


@dataclass
class Attachment:
    """What attach did, kept on the PeftModel as `.lora_ga` for save_converted."""
    adapter_dir: str
    adapter_name: str
    offset: str  # "adapter", "weights" or "none"
    method: str


def _lora_config(config: dict, overrides: dict):
    from peft import LoraConfig
    import dataclasses

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    values = {key: value for key, value in config.items() if key in fields and key != "peft_type"}
    values["init_lora_weights"] = True  # replaced by the adapter's factors below
    values.update(overrides)
    return LoraConfig(**values)


def _lora_layers(peft_model, adapter_name):
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def _full(tensor):
    """A DTensor's whole value, a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _copy_into(parameter, value):
    """Copies a whole float32 value into a parameter (a DTensor gets its local shard)."""
    import torch

    with torch.no_grad():
        if hasattr(parameter, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements)
            parameter.to_local().copy_(value.to_local())
        else:
            parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))


def _subtract_offset(weight, delta):
    """W ← W − delta in float32, cast once; a DTensor changes only its local block."""
    import torch

    with torch.no_grad():
        if hasattr(weight, "to_local"):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = weight.to_local()
            shape, start = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
            block = delta[start[0]:start[0] + shape[0], start[1]:start[1] + shape[1]]
            local.copy_((local.float() - block.to(local.device)).to(local.dtype))
        else:
            weight.copy_((weight.float() - delta.to(weight.device)).to(weight.dtype))


def attach(model, adapter_dir: str, offset: str = "adapter", adapter_name: str = "default", **config_overrides):
    """A trainable PeftModel on `model` with the lora-ga adapter in `adapter_dir`, whose output
    at step 0 equals `model`'s (for LoRA-GA; LoRA-One takes its intended first step).

    offset: "adapter" (frozen (A0, −B0) beside the trainable adapter; base untouched) or
    "weights" (W ← W − s·B0·A0 in memory).  config_overrides go to LoraConfig (e.g.
    lora_dropout=0.05, modules_to_save=["classifier"], task_type="SEQ_CLS").
    """
    import torch
    from peft import get_peft_model

    if offset not in ("adapter", "weights"):
        raise ValueError(f"offset must be 'adapter' or 'weights', not {offset!r}")
    config, tensors = read_adapter(adapter_dir)
    pairs = factor_pairs(tensors, adapter_dir)
    method = method_of(config)
    lora_config = _lora_config(config, config_overrides)
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)

    layers = dict(_lora_layers(peft_model, adapter_name))
    unmatched = sorted(set(pairs) - set(layers))
    if unmatched:
        raise AdapterError(f"{adapter_dir}: module '{unmatched[0]}' of the adapter is not in the model "
                           f"(adapted modules look like '{next(iter(layers), '?')}')")
    missing = sorted(set(layers) - set(pairs))
    if missing:
        raise AdapterError(f"{adapter_dir}: the model adapts '{missing[0]}' but the adapter has no factors for it")

    for name, layer in layers.items():
        a0, b0 = (torch.from_numpy(np.ascontiguousarray(x)) for x in pairs[name])
        _copy_into(layer.lora_A[adapter_name].weight, a0)
        _copy_into(layer.lora_B[adapter_name].weight, b0)

    mode = offset if needs_offset(config) else "none"
    if mode == "adapter":
        peft_model.add_adapter(OFFSET_ADAPTER, _lora_config(config, {**config_overrides, "lora_dropout": 0.0}))
        for name, layer in _lora_layers(peft_model, OFFSET_ADAPTER):
            a0, b0 = (torch.from_numpy(np.ascontiguousarray(x)) for x in pairs[name])
            _copy_into(layer.lora_A[OFFSET_ADAPTER].weight, a0)
            _copy_into(layer.lora_B[OFFSET_ADAPTER].weight, -b0)
        # Both active: their outputs add. set_adapter makes every active adapter trainable,
        # so the offset is frozen afterwards.
        peft_model.base_model.set_adapter([adapter_name, OFFSET_ADAPTER])
        for _, layer in _lora_layers(peft_model, OFFSET_ADAPTER):
            layer.lora_A[OFFSET_ADAPTER].weight.requires_grad_(False)
            layer.lora_B[OFFSET_ADAPTER].weight.requires_grad_(False)
    elif mode == "weights":
        for name, layer in layers.items():
            a0, b0 = (torch.from_numpy(np.ascontiguousarray(x)).float() for x in pairs[name])
            delta = layer.scaling[adapter_name] * (b0 @ a0)
            if layer.fan_in_fan_out:
                delta = delta.T
            _subtract_offset(layer.get_base_layer().weight, delta)
    peft_model.lora_ga = Attachment(os.path.abspath(adapter_dir), adapter_name, mode, method)
    return peft_model


def trained_state(peft_model, adapter_name: str = "default") -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config dict, tensors as saved by save_pretrained) of one adapter, as numpy."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {name: _full(value).detach().float().cpu().numpy() for name, value in state.items()}
    with tempfile.TemporaryDirectory() as directory:
        peft_model.peft_config[adapter_name].save_pretrained(directory)
        import json

        with open(os.path.join(directory, "adapter_config.json")) as f:
            config = json.load(f)
    return config, tensors


def save_converted(peft_model, out_dir: str) -> dict:
    """Writes a plain PEFT LoRA adapter to `out_dir` that reproduces the trained `peft_model`
    on the unmodified base: rank 2r, A' = [A; A0], B' = [B | −B0], alpha adjusted so the
    scaling is unchanged (for LoRA-One: the trained adapter as it is).  Returns its config."""
    attachment = getattr(peft_model, "lora_ga", None)
    if attachment is None:
        raise AdapterError("this PeftModel was not made by lora_ga.attach (no .lora_ga): "
                           "use `python -m lora_ga.convert INITIAL TRAINED OUT` instead")
    initial_config, initial_tensors = read_adapter(attachment.adapter_dir)
    trained_config, trained_tensors = trained_state(peft_model, attachment.adapter_name)
    trained_config.pop(METHOD_KEY, None)
    config, tensors = convert(initial_config, initial_tensors, trained_config, trained_tensors)
    write_adapter(out_dir, config, tensors)
    return config
