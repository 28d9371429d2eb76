"""Turn a LoRA-GA adapter trained from an offset start into a plain LoRA adapter for the
unmodified base (numpy only; no torch).

Training from a LoRA-GA initialization (A0, B0) computes, for every adapted layer,

    W + s·B·A − s·B0·A0 = W + s·[B | −B0]·[A; A0]

so one LoRA adapter of rank 2r with A' = [A; A0] and B' = [B | −B0] reproduces the trained
model on the original base.  Its scaling must stay s: with s = alpha / r the new alpha is
2·alpha (alpha' / 2r = alpha / r); with rsLoRA (s = alpha / √r) it is √2·alpha.  rank_pattern
entries double and alpha_pattern entries get the same factor.  fan_in_fan_out layers need
nothing special (A and B keep PEFT's [r, in] / [out, r] meaning).

An adapter whose method needs no offset (LoRA-One) is already plain: the trained adapter is
written as it is.

Command line:

    python -m lora_ga.convert INITIAL TRAINED OUT

INITIAL is the directory `lora-ga init` wrote, TRAINED the one PEFT's save_pretrained wrote
after training (the trainable adapter only), OUT the new adapter directory.
Exit status: 0 written; 2 usage; 3 unusable inputs (missing or mismatched modules, shapes,
scalings).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from .peft_safetensors import (
    FACTOR_NAME,
    METHOD_KEY,
    AdapterError,
    factor_pairs,
    needs_offset,
    pattern_value,
    read_adapter,
    write_adapter,
)

# LoraConfig fields that describe how the initial factors were made; the converted adapter
# holds trained values, so they go back to PEFT's defaults.
_INITIALIZATION_FIELDS = {"init_lora_weights": True, "lora_ga_config": None}


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = float(pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _strip(module: str) -> str:
    return module[len("base_model.model."):] if module.startswith("base_model.model.") else module


def convert(initial_config: dict, initial_tensors: dict, trained_config: dict, trained_tensors: dict,
            source: str = "trained adapter") -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors) of the plain adapter equivalent to the trained one on the unmodified base."""
    config = {key: value for key, value in trained_config.items() if key != METHOD_KEY}
    config.update(_INITIALIZATION_FIELDS)
    trained = factor_pairs(trained_tensors, source)
    if not needs_offset(initial_config):
        return config, {name: np.asarray(value, dtype=np.float32) for name, value in trained_tensors.items()}

    initial = factor_pairs(initial_tensors, "initial adapter")
    missing = sorted(set(initial) ^ set(trained))
    if missing:
        raise AdapterError(f"the initial and trained adapters adapt different modules, e.g. '{missing[0]}'")
    if bool(initial_config.get("use_rslora")) != bool(trained_config.get("use_rslora")):
        raise AdapterError("the initial and trained adapters differ in use_rslora")
    if bool(initial_config.get("fan_in_fan_out")) != bool(trained_config.get("fan_in_fan_out")):
        raise AdapterError("the initial and trained adapters differ in fan_in_fan_out")
    # s' = s with twice the rank: alpha grows by 2 (alpha / r) or √2 (alpha / √r).
    factor = math.sqrt(2.0) if trained_config.get("use_rslora") else 2.0
    # Tensors that are not LoRA factors (modules_to_save, biases) pass through unchanged.
    tensors: dict[str, np.ndarray] = {
        name: np.asarray(value, dtype=np.float32) for name, value in trained_tensors.items()
        if FACTOR_NAME.match(name) is None}
    for module in sorted(trained):
        a, b = trained[module]
        a0, b0 = initial[module]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise AdapterError(f"'{module}': trained factors {list(a.shape)}, {list(b.shape)} but initial "
                               f"{list(a0.shape)}, {list(b0.shape)}")
        rank = a.shape[0]
        s, s0 = _scaling(trained_config, _strip(module), rank), _scaling(initial_config, _strip(module), rank)
        if not math.isclose(s, s0, rel_tol=1e-9):
            raise AdapterError(f"'{module}': the trained adapter's scaling {s} differs from the initial one's {s0}")
        tensors[f"{module}.lora_A.weight"] = np.concatenate([a, a0], axis=0).astype(np.float32)
        tensors[f"{module}.lora_B.weight"] = np.concatenate([b, -b0], axis=1).astype(np.float32)
    config["r"] = 2 * int(trained_config["r"])
    config["lora_alpha"] = factor * float(trained_config["lora_alpha"])
    config["rank_pattern"] = {key: 2 * int(value) for key, value in (trained_config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {key: factor * float(value) for key, value in (trained_config.get("alpha_pattern") or {}).items()}
    return config, tensors


def convert_directories(initial_dir: str, trained_dir: str, out_dir: str) -> dict:
    """Reads INITIAL and TRAINED, writes OUT; returns the new adapter_config.json dict."""
    initial_config, initial_tensors = read_adapter(initial_dir)
    trained_config, trained_tensors = read_adapter(trained_dir)
    config, tensors = convert(initial_config, initial_tensors, trained_config, trained_tensors, source=trained_dir)
    write_adapter(out_dir, config, tensors)
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lora_ga.convert",
        description="Write a plain PEFT LoRA adapter (rank 2r: A' = [A; A0], B' = [B | −B0], alpha adjusted) that "
                    "reproduces a model trained from a LoRA-GA initialization on the unmodified base.")
    parser.add_argument("initial", metavar="INITIAL", help="adapter directory lora-ga wrote (the initialization)")
    parser.add_argument("trained", metavar="TRAINED", help="adapter directory saved after training (save_pretrained)")
    parser.add_argument("out", metavar="OUT", help="directory for the converted adapter")
    args = parser.parse_args(argv)
    try:
        config = convert_directories(args.initial, args.trained, args.out)
    except AdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(f"wrote {args.out}: r = {config['r']}, lora_alpha = {config['lora_alpha']:g}"
          + (" (rsLoRA)" if config.get("use_rslora") else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
