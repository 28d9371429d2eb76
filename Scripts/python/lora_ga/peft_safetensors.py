"""Reading and writing PEFT adapter directories with numpy only (no torch).

An adapter directory holds adapter_model.safetensors (tensors named
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r])
and adapter_config.json.  F32, F16, BF16 and F64 tensors are read as float32 arrays
(BF16 through its bit pattern); tensors are written as F32.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# The adapter_config.json key lora-ga writes to describe the initialization (method, offset).
METHOD_KEY = "lora_ga"
MAX_HEADER = 100 << 20

_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_WIDTHS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
FACTOR_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(Exception):
    """An adapter directory that cannot be used; the message says which file and why."""


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All float tensors of a safetensors file as float32 arrays, and its metadata."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER:
                raise AdapterError(f"{path}: header of {length} bytes is implausibly large")
            header = json.loads(f.read(length).decode("utf-8"))
            data = f.read()
    except OSError as error:
        raise AdapterError(f"{path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path}: header is not valid JSON ({error})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, spec in header.items():
        dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in _WIDTHS:
            raise AdapterError(f"{path}: tensor '{name}' is {dtype}, not a float tensor")
        if int(np.prod(shape, dtype=np.int64)) * _WIDTHS[dtype] != end - begin or end > len(data):
            raise AdapterError(f"{path}: tensor '{name}' ({dtype} {shape}) does not match its data")
        raw = np.frombuffer(data, dtype=np.uint8, count=end - begin, offset=begin)
        if dtype == "BF16":
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.view(_NUMPY_DTYPES[dtype]).astype(np.float32)
        tensors[name] = values.reshape(shape)
    return tensors, metadata


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes float32 tensors (in the dict's order) to a temporary file, then renames it."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays, offset = [], 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(temporary, path)


def read_adapter(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json as a dict, tensors as float32 arrays) of a PEFT LoRA adapter."""
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterError(f"{path}: not found (expected a PEFT adapter directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_path}: cannot read ({error})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')}, expected LORA")
    tensors, _ = read_safetensors(weights_path)
    return config, tensors


def write_adapter(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def factor_pairs(tensors: dict[str, np.ndarray], source: str = "adapter") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module → (lora_A [r, in], lora_B [out, r]), keyed by the module part of the tensor names."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = FACTOR_NAME.match(name)
        if match:
            found.setdefault(match.group("module"), {})[match.group("factor")] = value
    pairs = {}
    for module, factors in found.items():
        if set(factors) != {"A", "B"}:
            raise AdapterError(f"{source}: module '{module}' has lora_{''.join(factors)} but not both factors")
        a, b = factors["A"], factors["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{source}: '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not multiply")
        pairs[module] = (a, b)
    if not pairs:
        raise AdapterError(f"{source}: no lora_A / lora_B tensors")
    return pairs


def method_of(config: dict) -> str:
    """'lora-ga' or 'lora-one'; adapters without lora-ga's key are LoRA-GA adapters from
    before the key existed (they need the base offset)."""
    return str((config.get(METHOD_KEY) or {}).get("method", "lora-ga"))


def needs_offset(config: dict) -> bool:
    description = config.get(METHOD_KEY) or {}
    return bool(description.get("base_offset", method_of(config) == "lora-ga"))


def pattern_value(module: str, patterns: dict | None, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the whole module name or a dotted suffix."""
    for key, value in (patterns or {}).items():
        if module == key or re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
