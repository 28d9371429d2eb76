#!/usr/bin/env python3
"""apply_lora_ga.py — offset a base model's frozen weights for a LoRA-GA adapter.

WHAT
  LoRA-GA factors are not zero, so a model that loads the adapter computes
  W + scaling · lora_B @ lora_A from step 0.  To start training from the base
  model's function, each targeted frozen weight must first be offset:

      W_new = W − scaling · lora_B @ lora_A
      scaling = lora_alpha / r            (lora_alpha / sqrt(r) with use_rslora)

  This script reads a PEFT adapter written by lora-ga (OUT/adapter_model.safetensors,
  OUT/adapter_config.json), finds each adapter module's weight `<module>.weight` in the
  base model's safetensors shards, and writes a copy of every shard to NEW_BASE_DIR
  with the offset applied.  Each shard keeps its file name, header, tensor order, dtype
  and byte layout; tensors that are not targeted are copied byte for byte.  The
  offset is computed in float64 and rounded once (round-to-nearest-even) to the base
  dtype (F32, F16, BF16 or F64), in row blocks, so memory stays at a few blocks
  however large the model is.  Only numpy is needed (BF16 is read and written as
  uint16 bit patterns; the safetensors header is parsed here).

  Name matching: for adapter module M the base tensor is looked up as `M.weight`,
  then for each --prefix P as `P.M.weight` (adding P) and, when M starts with `P.`,
  as the rest of M + `.weight` (stripping P).  Modules that cannot be found are
  listed with a suggested --prefix when one is visible, and nothing is written.

  --check verifies an already written NEW_BASE_DIR against the base and the adapter:
  every targeted weight must satisfy W_new + scaling · B @ A == W_old within the
  rounding error of one conversion to the base dtype (scaled by --tolerance), and
  every other tensor, header and metadata must be unchanged.

  The offset is small compared with W; in BF16 part of it may fall below the
  precision of W and be rounded away.  The "lost" column reports that fraction
  (‖(W_old − W_new) − offset‖ / ‖offset‖); a large value means the base should be
  kept in F32 (or the offset applied in a wider dtype by the training job).

USAGE
  apply_lora_ga.py --adapter OUT --base SHARD.safetensors [--base SHARD2 ...]
                   --output NEW_BASE_DIR [--prefix PREFIX ...] [--force]
                   [--dry-run] [--json STATS.json]
  apply_lora_ga.py --check --adapter OUT --base SHARD... --output NEW_BASE_DIR
                   [--prefix PREFIX ...] [--tolerance FACTOR]

  --base may also be a directory: every *.safetensors file in it is a shard, and its
  other small files (config.json, tokenizer files, model.safetensors.index.json, ...)
  are copied to NEW_BASE_DIR so the result loads with from_pretrained.

  Exit status: 0 success; 1 --check found a mismatch; 2 bad input (missing module,
  shape mismatch, unreadable file, non-finite result, ...).  Names and shapes are all
  checked before anything is written; each shard is written to a temp file and renamed,
  so an error later leaves only complete shards (rerun with --force).

EXAMPLE
  lora-ga init --rank 8 -o lora-ga-out grads/
  python3 Scripts/apply_lora_ga.py --adapter lora-ga-out \\
      --base llama/model-00001-of-00002.safetensors \\
      --base llama/model-00002-of-00002.safetensors --output llama-lora-ga
  python3 Scripts/apply_lora_ga.py --check --adapter lora-ga-out \\
      --base llama/model-00001-of-00002.safetensors \\
      --base llama/model-00002-of-00002.safetensors --output llama-lora-ga
  # then: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("llama-lora-ga"),
  #                                 "lora-ga-out", is_trainable=True)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MAX_HEADER = 100 << 20
# Elements per row block while offsetting: bounds memory to a few hundred MB.
BLOCK_ELEMENTS = 1 << 22
COPY_CHUNK = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

BYTES_PER_ELEMENT = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Unit roundoff u (|fl(x) - x| <= u|x| for normal results) and the largest absolute
# rounding error in the subnormal range (half the smallest subnormal, doubled for slack).
UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}
SUBNORMAL_ERROR = {"F64": 2.0 ** -1074, "F32": 2.0 ** -149, "F16": 2.0 ** -24, "BF16": 2.0 ** -133}


class InputError(Exception):
    """A problem with the inputs; the message says what and where."""


# --------------------------------------------------------------------------- safetensors


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    begin: int  # offsets within the data section
    end: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


class SafeTensors:
    """A safetensors file: validated header plus a read-only memory map of the data."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise InputError(f"{path}: too short to be a safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > MAX_HEADER or 8 + header_len > size:
                    raise InputError(f"{path}: header length {header_len} does not fit the file ({size} bytes)")
                self.header_bytes = f.read(header_len)
        except OSError as error:
            raise InputError(f"{path}: {error.strerror or error}") from None
        try:
            header = json.loads(self.header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: header is not a JSON object")
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.metadata = header.pop("__metadata__", None)
        self.entries: dict[str, TensorEntry] = {}
        for name, spec in header.items():
            try:
                dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise InputError(f"{path}: tensor '{name}' has a malformed header entry") from None
            if dtype not in BYTES_PER_ELEMENT:
                raise InputError(f"{path}: tensor '{name}' has unknown dtype {dtype}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= begin <= end <= data_size):
                raise InputError(f"{path}: tensor '{name}' has invalid shape {list(shape)} or offsets [{begin}, {end}]")
            if math.prod(shape) * BYTES_PER_ELEMENT[dtype] != end - begin:
                raise InputError(f"{path}: tensor '{name}' ({dtype} {list(shape)}) does not match its {end - begin} data bytes")
            self.entries[name] = TensorEntry(name, dtype, shape, begin, end)
        self.size = size
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)

    def raw(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        return self._map[self.data_start + entry.begin: self.data_start + entry.end]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D float tensor, as float64."""
        entry = self.entries[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise InputError(f"{self.path}: tensor '{name}' is {entry.dtype}, not a float tensor")
        cols = entry.shape[1] if len(entry.shape) == 2 else 1
        width = BYTES_PER_ELEMENT[entry.dtype]
        offset = self.data_start + entry.begin + start * cols * width
        raw = self._map[offset: offset + (stop - start) * cols * width]
        return decode(raw, entry.dtype).reshape(stop - start, cols)

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if len(entry.shape) != 2:
            raise InputError(f"{self.path}: tensor '{name}' has shape {list(entry.shape)}, expected 2-D")
        return self.rows(name, 0, entry.shape[0])


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes of a float dtype → float64 (exact for every float dtype)."""
    if dtype == "BF16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float64)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """float64 → little-endian bytes of `dtype`, one round-to-nearest-even rounding
    (BF16 goes through F32, whose rounding error is far below BF16's)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return rounded.astype("<u2").tobytes()
    return np.ascontiguousarray(values, dtype={"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).tobytes()


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """What `values` become once stored as `dtype`, back in float64."""
    return decode(np.frombuffer(encode(values, dtype), dtype=np.uint8), dtype).reshape(values.shape)


# --------------------------------------------------------------------------- adapter


@dataclass
class AdapterModule:
    module: str
    a_name: str
    b_name: str
    rank: int
    in_features: int
    out_features: int
    scaling: float
    base_name: str = ""
    shard: "SafeTensors | None" = None
    transposed: bool = False  # fan_in_fan_out: the base stores [in, out]
    stats: dict = field(default_factory=dict)


def pattern_value(module: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the full module name
    or a dotted suffix of it (the first match in the dict's order wins)."""
    for key, value in (patterns or {}).items():
        if module == key or re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(directory: str):
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    for path in (weights_path, config_path):
        if not os.path.isfile(path):
            raise InputError(f"{path}: not found (--adapter must be the directory lora-ga wrote)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{config_path}: cannot read ({error})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{config_path}: peft_type is {config.get('peft_type')}, expected LORA")
    if config.get("use_dora"):
        raise InputError(f"{config_path}: use_dora is set; DoRA adapters need a different offset")
    try:
        r_default = int(config["r"])
        alpha_default = float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{config_path}: needs numeric 'r' and 'lora_alpha'") from None
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    adapter = SafeTensors(weights_path)
    factor_re = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    factors: dict[str, dict[str, str]] = {}
    for name in adapter.entries:
        match = factor_re.match(name)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = name
    if not factors:
        raise InputError(f"{weights_path}: no lora_A / lora_B tensors")

    modules = []
    for module in sorted(factors):
        pair = factors[module]
        if set(pair) != {"A", "B"}:
            raise InputError(f"{weights_path}: module '{module}' has lora_{''.join(pair)} but not both factors")
        a, b = adapter.entries[pair["A"]], adapter.entries[pair["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{weights_path}: '{module}' has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not multiply")
        for entry in (a, b):
            if entry.dtype not in FLOAT_DTYPES:
                raise InputError(f"{weights_path}: '{entry.name}' is {entry.dtype}, not a float tensor")
        rank = a.shape[0]
        r = int(pattern_value(module, config.get("rank_pattern"), r_default))
        if r != rank:
            raise InputError(f"{weights_path}: '{module}' has rank {rank} but adapter_config.json says r = {r}")
        alpha = float(pattern_value(module, config.get("alpha_pattern"), alpha_default))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules.append(AdapterModule(module, pair["A"], pair["B"], rank, a.shape[1], b.shape[0], scaling,
                                     transposed=fan_in_fan_out))

    targets = config.get("target_modules")
    if isinstance(targets, list):
        listed = set(targets)
        unlisted = [m.module for m in modules if m.module not in listed and not any(m.module.endswith("." + t) for t in listed)]
        if unlisted:
            print(f"warning: {len(unlisted)} adapter modules are not in target_modules, e.g. {unlisted[0]}", file=sys.stderr)
    return adapter, modules, config


# --------------------------------------------------------------------------- base shards


def expand_bases(paths):
    """--base arguments → (shard paths, extra files to copy from base directories)."""
    shards, extras = [], []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
            if not found:
                raise InputError(f"{path}: directory holds no *.safetensors files")
            shards += found
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
                    extras.append(full)
        elif os.path.isfile(path):
            shards.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    names = [os.path.basename(p) for p in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"shards must have distinct file names (the output keeps them); repeated: {', '.join(duplicates)}")
    return shards, extras


def normalized_prefixes(prefixes):
    result = []
    for prefix in prefixes or []:
        prefix = prefix.strip()
        if prefix and not prefix.endswith("."):
            prefix += "."
        if prefix:
            result.append(prefix)
    return result


def candidates(module: str, prefixes):
    names = [module + ".weight"]
    for prefix in prefixes:
        names.append(prefix + module + ".weight")
        if module.startswith(prefix):
            names.append(module[len(prefix):] + ".weight")
    return names


def suggest_prefix(module: str, base_names) -> str:
    """A hint for a module not found: a prefix that would make it match."""
    target = "." + module + ".weight"
    for name in base_names:
        if name.endswith(target):
            return f"base has '{name}': try --prefix {name[: -len(target)]}"
    for name in base_names:
        if name.endswith(".weight"):
            stem = name[: -len(".weight")]
            if module.endswith("." + stem):
                return f"base has '{name}': try --prefix {module[: -len(stem) - 1]}"
    last = module.rsplit(".", 1)[-1]
    similar = [n for n in base_names if n.endswith("." + last + ".weight")]
    if similar:
        return f"no prefix fits; base names look like '{similar[0]}'"
    return "no similar name in the base"


def resolve(modules, shards, prefixes):
    """Finds every module's base tensor; raises listing all that are missing or misfit."""
    owner: dict[str, SafeTensors] = {}
    for shard in shards:
        for name in shard.entries:
            if name in owner:
                raise InputError(f"tensor '{name}' is in both {owner[name].path} and {shard.path}")
            owner[name] = shard
    problems = []
    for m in modules:
        found = next((n for n in candidates(m.module, prefixes) if n in owner), None)
        if found is None:
            problems.append(f"  {m.module}: not found as {' / '.join(candidates(m.module, prefixes))} ({suggest_prefix(m.module, owner)})")
            continue
        entry = owner[found].entries[found]
        expected = (m.in_features, m.out_features) if m.transposed else (m.out_features, m.in_features)
        if entry.dtype not in FLOAT_DTYPES:
            problems.append(f"  {m.module}: base tensor '{found}' is {entry.dtype}, not a float tensor")
        elif tuple(entry.shape) != expected:
            hint = ""
            if tuple(entry.shape) == expected[::-1]:
                hint = " (transposed: is fan_in_fan_out set correctly in adapter_config.json?)"
            problems.append(f"  {m.module}: base tensor '{found}' has shape {list(entry.shape)}, the adapter needs {list(expected)}{hint}")
        else:
            m.base_name, m.shard = found, owner[found]
    if problems:
        raise InputError(f"{len(problems)} of {len(modules)} adapter modules cannot be applied to the base:\n" + "\n".join(problems))
    targeted = [m.base_name for m in modules]
    if len(set(targeted)) != len(targeted):
        raise InputError("two adapter modules resolve to the same base tensor; check --prefix")


def offset_rows(m: AdapterModule, a: np.ndarray, b: np.ndarray, start: int, stop: int) -> np.ndarray:
    """scaling · B @ A for base rows [start, stop), in float64 (transposed for fan_in_fan_out)."""
    if m.transposed:
        return m.scaling * (a[:, start:stop].T @ b.T)
    return m.scaling * (b[start:stop] @ a)


def row_blocks(rows: int, cols: int):
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


# --------------------------------------------------------------------------- apply


def copy_file(source: str, destination: str):
    with open(source, "rb") as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def apply(adapter, modules, shards, extras, output, force, dry_run):
    by_shard: dict[str, list[AdapterModule]] = {}
    for m in modules:
        by_shard.setdefault(m.shard.path, []).append(m)
    real_output = os.path.realpath(output)
    for shard in shards:
        if os.path.dirname(os.path.realpath(shard.path)) == real_output:
            raise InputError(f"--output {output} is the directory of base shard {shard.path}; choose a new directory")
    destinations = [os.path.join(output, os.path.basename(p)) for p in [s.path for s in shards] + extras]
    existing = [d for d in destinations if os.path.exists(d)]
    if existing and not force and not dry_run:
        raise InputError(f"{existing[0]} already exists ({len(existing)} output files do); use --force to overwrite")
    if not dry_run:
        os.makedirs(output, exist_ok=True)

    for shard in shards:
        destination = os.path.join(output, os.path.basename(shard.path))
        temporary = os.path.join(output, f".{os.path.basename(shard.path)}.tmp-{os.getpid()}")
        targets = by_shard.get(shard.path, [])
        out = None
        try:
            if not dry_run:
                copy_file(shard.path, temporary)
                out = open(temporary, "r+b")
            for m in targets:
                a, b = adapter.read(m.a_name), adapter.read(m.b_name)
                entry = shard.entries[m.base_name]
                rows, cols = entry.shape
                width = BYTES_PER_ELEMENT[entry.dtype]
                w2 = off2 = lost2 = 0.0
                for start, stop in row_blocks(rows, cols):
                    old = shard.rows(m.base_name, start, stop)
                    off = offset_rows(m, a, b, start, stop)
                    new = rounded(old - off, entry.dtype)
                    if not np.all(np.isfinite(new)):
                        row = start + int(np.argwhere(~np.isfinite(new))[0][0])
                        raise InputError(f"{m.module}: offset weight is not finite in row {row} (base {entry.dtype} overflow or NaN in the inputs)")
                    w2 += float(np.sum(old * old))
                    off2 += float(np.sum(off * off))
                    lost = (old - new) - off
                    lost2 += float(np.sum(lost * lost))
                    if out is not None:
                        out.seek(shard.data_start + entry.begin + start * cols * width)
                        out.write(encode(new, entry.dtype))
                m.stats = {"module": m.module, "base_tensor": m.base_name, "shard": os.path.basename(shard.path),
                           "dtype": entry.dtype, "shape": [rows, cols], "rank": m.rank, "scaling": m.scaling,
                           "offset_norm": math.sqrt(off2), "weight_norm": math.sqrt(w2),
                           "lost_fraction": math.sqrt(lost2 / off2) if off2 > 0 else 0.0}
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
                out.close()
                out = None
                os.replace(temporary, destination)
        finally:
            if out is not None:
                out.close()
            if not dry_run and os.path.exists(temporary):
                os.unlink(temporary)
    if not dry_run:
        for extra in extras:
            shutil.copyfile(extra, os.path.join(output, os.path.basename(extra)))


# --------------------------------------------------------------------------- check


def check(adapter, modules, shards, output, tolerance):
    """Returns a list of problems (empty when NEW_BASE_DIR is the base with the offsets applied)."""
    problems = []
    targeted = {(m.shard.path, m.base_name): m for m in modules}
    for shard in shards:
        new_path = os.path.join(output, os.path.basename(shard.path))
        if not os.path.isfile(new_path):
            problems.append(f"{new_path}: missing")
            continue
        new = SafeTensors(new_path)
        if new.header_bytes != shard.header_bytes:
            problems.append(f"{new_path}: header differs from {shard.path} (tensor names, dtypes, shapes, offsets or metadata)")
            continue
        if new.size != shard.size:
            problems.append(f"{new_path}: size {new.size} differs from {shard.path} ({shard.size})")
            continue
        for name, entry in shard.entries.items():
            m = targeted.get((shard.path, name))
            if m is None:
                old_raw, new_raw = shard.raw(name), new.raw(name)
                for at in range(0, len(old_raw), COPY_CHUNK):
                    if not np.array_equal(old_raw[at: at + COPY_CHUNK], new_raw[at: at + COPY_CHUNK]):
                        problems.append(f"{new_path}: tensor '{name}' is not targeted but changed")
                        break
                continue
            a, b = adapter.read(m.a_name), adapter.read(m.b_name)
            rows, cols = entry.shape
            u, floor = UNIT_ROUNDOFF[entry.dtype], SUBNORMAL_ERROR[entry.dtype]
            worst = 0.0  # largest error / allowed error
            err2 = w2 = off2 = 0.0
            bad = 0
            for start, stop in row_blocks(rows, cols):
                old = shard.rows(name, start, stop)
                updated = new.rows(name, start, stop)
                off = offset_rows(m, a, b, start, stop)
                error = np.abs(updated + off - old)
                # One rounding to the base dtype, plus float64 slack for the sum itself.
                allowed = tolerance * (1.01 * u * np.abs(updated) + floor) + 1e-12 * (np.abs(old) + np.abs(off))
                with np.errstate(invalid="ignore"):
                    ratio = np.where(np.isfinite(error), error / allowed, np.inf)
                bad += int(np.count_nonzero(~(ratio <= 1.0)))
                worst = max(worst, float(np.max(ratio)) if ratio.size else 0.0)
                err2 += float(np.sum(np.where(np.isfinite(error), error, 0.0) ** 2))
                w2 += float(np.sum(old * old))
                off2 += float(np.sum(off * off))
            m.stats = {"module": m.module, "base_tensor": name, "shard": os.path.basename(shard.path),
                       "dtype": entry.dtype, "shape": [rows, cols], "rank": m.rank, "scaling": m.scaling,
                       "offset_norm": math.sqrt(off2), "weight_norm": math.sqrt(w2),
                       "relative_error": math.sqrt(err2 / w2) if w2 > 0 else math.sqrt(err2),
                       "worst_error_over_bound": worst, "elements_out_of_tolerance": bad, "ok": bad == 0}
            if bad:
                problems.append(f"{m.module}: {bad} of {rows * cols} elements of '{name}' violate "
                                f"W_new + scaling·B@A = W_old (worst error {worst:.3g}× the {entry.dtype} rounding bound)")
    return problems


# --------------------------------------------------------------------------- output


def print_table(modules, checking):
    headers = ["module", "shape", "dtype", "scaling", "‖offset‖_F", "‖W‖_F", "‖off‖/‖W‖"]
    headers.append("check (err/bound)" if checking else "lost")
    rows = []
    for m in modules:
        s = m.stats
        if not s:
            continue
        ratio = s["offset_norm"] / s["weight_norm"] if s["weight_norm"] > 0 else float("inf")
        last = (f"{'ok' if s['ok'] else 'FAIL'} ({s['worst_error_over_bound']:.2f})" if checking
                else f"{100 * s['lost_fraction']:.2f}%")
        rows.append([m.module, "×".join(map(str, s["shape"])), s["dtype"], f"{s['scaling']:.4g}",
                     f"{s['offset_norm']:.6g}", f"{s['weight_norm']:.6g}", f"{ratio:.3e}", last])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    renamed = [m for m in modules if m.base_name and m.base_name != m.module + ".weight"]
    if renamed:
        print(f"\n{len(renamed)} modules matched with a prefix, e.g. {renamed[0].module} → {renamed[0].base_name}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="apply_lora_ga.py",
        description="Offset a base model's frozen weights for a LoRA-GA adapter: "
                    "W_new = W − scaling · lora_B @ lora_A, written as new safetensors shards "
                    "(same names, layout and dtype; untargeted tensors copied unchanged).",
        epilog="Example: apply_lora_ga.py --adapter lora-ga-out --base model.safetensors --output model-lora-ga; "
               "then the same with --check. Exit status: 0 ok, 1 check failed, 2 bad input.")
    parser.add_argument("--adapter", required=True, metavar="OUT",
                        help="adapter directory (adapter_model.safetensors + adapter_config.json)")
    parser.add_argument("--base", required=True, action="append", metavar="SHARD",
                        help="base model safetensors shard, or a directory of them; repeat for every shard")
    parser.add_argument("--output", required=True, metavar="NEW_BASE_DIR",
                        help="directory for the offset shards (with --check: the directory to verify)")
    parser.add_argument("--prefix", action="append", default=[], metavar="PREFIX",
                        help="also match base names with this prefix added to, or stripped from, the adapter's "
                             "module names (e.g. model. or bert.); repeatable; exact names are tried first")
    parser.add_argument("--check", action="store_true",
                        help="verify NEW_BASE_DIR instead of writing it: W_new + scaling·B@A = W_old per layer "
                             "(to the base dtype's rounding), everything else byte-identical")
    parser.add_argument("--tolerance", type=float, default=1.0, metavar="FACTOR",
                        help="--check: multiply the allowed error (one rounding to the base dtype) by FACTOR, e.g. 4 "
                             "when the offset was applied by a tool computing in the base dtype (default 1)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files in NEW_BASE_DIR")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve names and print the table without writing anything")
    parser.add_argument("--json", metavar="FILE", help="also write the per-layer table as JSON to FILE")
    args = parser.parse_args(argv)
    if args.tolerance <= 0:
        parser.error("--tolerance must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        adapter, modules, config = load_adapter(args.adapter)
        shard_paths, extras = expand_bases(args.base)
        shards = [SafeTensors(p) for p in shard_paths]
        resolve(modules, shards, normalized_prefixes(args.prefix))
        rslora = " (rsLoRA)" if config.get("use_rslora") else ""
        print(f"adapter {args.adapter}: {len(modules)} modules, r={config.get('r')}, lora_alpha={config.get('lora_alpha')}{rslora}; "
              f"base: {len(shards)} shard(s)", file=sys.stderr)
        if args.check:
            problems = check(adapter, modules, shards, args.output, args.tolerance)
        else:
            apply(adapter, modules, shards, extras, args.output, args.force, args.dry_run)
            problems = []
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_table(modules, args.check)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": "check" if args.check else ("dry-run" if args.dry_run else "apply"),
                       "ok": not problems, "problems": problems,
                       "layers": [m.stats for m in modules if m.stats]}, f, indent=2)
    if problems:
        print(f"\ncheck FAILED ({len(problems)} problems):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.check:
        print(f"\ncheck passed: {len(modules)} layers satisfy W_new + scaling·B@A = W_old; other tensors unchanged", file=sys.stderr)
    elif args.dry_run:
        print("\ndry run: nothing written", file=sys.stderr)
    else:
        print(f"\nwrote {len(shards)} shard(s) to {args.output}; verify with --check", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
