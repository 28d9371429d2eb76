#!/usr/bin/env python3
"""The pipeline a user would write instead of lora-ga, measured the same way (Scripts/bench).

Loads every gradient file with safetensors.numpy (F32), sums the layers, and calls
sklearn.utils.extmath.randomized_svd(G, n_components=2r, random_state=0) with its other
defaults — or, with --method torch, torch.svd_lowrank(G, q=min(4r, min(G.shape)), niter=4),
the call the official LoRA-GA code makes — then forms the LoRA-GA factors
(ArB2r: lora_A = Vt[0:r], lora_B = U[:, r:2r], stable scale). Nothing big is written.

Measures wall and CPU time and peak RSS of the pipeline itself (getrusage, before the
fidelity check), then the exact fidelity ratio
    ‖P_B G + G P_A − G‖_F / ‖G − G_2r‖_F
with the numerator computed in row blocks and the denominator from the planted spectrum
that `lora-ga synth` wrote (planted-spectrum.json in or next to the paths, or --planted).
Writes one JSON object to --json (or stdout).

    python3 Scripts/bench_reference.py --rank 8 /tmp/big/w0 /tmp/big/w1 --json ref.json
"""
import argparse
import json
import os
import resource
import sys
import time

WALL0 = time.perf_counter()
CPU0 = time.process_time()

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402


def gradient_files(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".safetensors")]
        else:
            files.append(path)
    if not files:
        sys.exit(f"no .safetensors files under {' '.join(paths)}")
    return files


def planted_spectrum(paths, explicit):
    candidates = [explicit] if explicit else []
    for path in paths:
        candidates += [os.path.join(path, "planted-spectrum.json"),
                       os.path.join(os.path.dirname(os.path.abspath(path)), "planted-spectrum.json")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            with open(candidate) as handle:
                return json.load(handle)["layers"]
    return None


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def exact_ratio(g, lora_b, lora_a, singular_values, rank, block_rows=512):
    """‖P_B G + G P_A − G‖_F (row blocks, float64 sums) over the planted ‖G − G_2r‖_F."""
    qb, _ = np.linalg.qr(lora_b.astype(np.float64))        # out × r
    qa, _ = np.linalg.qr(lora_a.T.astype(np.float64))      # in × r
    qb, qa = qb.astype(np.float32), qa.astype(np.float32)
    qbt_g = qb.T @ g                                        # r × in
    total = 0.0
    for start in range(0, g.shape[0], block_rows):
        block = g[start:start + block_rows]
        residual = qb[start:start + block_rows] @ qbt_g + (block @ qa) @ qa.T - block
        total += float(np.sum(np.square(residual, dtype=np.float64)))
    tail = np.asarray(singular_values, dtype=np.float64)[2 * rank:]
    optimum = float(np.sqrt(np.sum(tail ** 2)))
    return float(np.sqrt(total)) / optimum if optimum > 0 else float("nan")


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"note": "threadpoolctl not importable"}
    return [{key: entry.get(key) for key in ("internal_api", "prefix", "version", "architecture", "num_threads", "threading_layer", "filepath")}
            for entry in threadpool_info()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="gradient files or directories")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--gamma", type=float, default=16.0)
    parser.add_argument("--method", choices=["sklearn", "torch"], default="sklearn")
    parser.add_argument("--planted", help="planted-spectrum.json (default: found in or next to the paths)")
    parser.add_argument("--json", help="write the result here (default: stdout)")
    args = parser.parse_args()
    r = args.rank

    if args.method == "torch":
        try:
            import torch
        except ImportError as error:
            result = {"method": "torch.svd_lowrank", "skipped": f"torch not importable ({error})"}
            write(result, args.json)
            return
        torch.manual_seed(0)
    else:
        from sklearn.utils.extmath import randomized_svd

    import_seconds = time.perf_counter() - WALL0
    start = time.perf_counter()

    # Load and sum: what `G = sum(load_file(f)[name] for f in files)` does, without a third copy.
    # (safetensors.numpy reads a file's bytes, then copies them into arrays: its peak is twice the file.)
    summed = {}
    for path in gradient_files(args.paths):
        tensors = load_file(path)
        for name in list(tensors):
            tensor = tensors.pop(name)
            if tensor.ndim != 2 or not np.issubdtype(tensor.dtype, np.floating):
                continue
            tensor = tensor.astype(np.float32, copy=False)
            if name in summed:
                summed[name] += tensor
            else:
                summed[name] = tensor
            del tensor
        del tensors
    load_seconds = time.perf_counter() - start

    factors = {}
    svd_seconds = 0.0
    scale = None
    for name, g in summed.items():
        t = time.perf_counter()
        if args.method == "torch":
            u, s, v = torch.svd_lowrank(torch.from_numpy(g), q=min(4 * r, min(g.shape)), niter=4)
            u, vt = u.numpy(), v.numpy().T
        else:
            u, s, vt = randomized_svd(g, n_components=2 * r, random_state=0)
        scale = g.shape[0] ** 0.25 / np.sqrt(args.gamma)
        factors[name] = (u[:, r:2 * r] * scale, vt[:r] * scale)   # lora_B [out, r], lora_A [r, in]
        svd_seconds += time.perf_counter() - t
    pipeline_seconds = time.perf_counter() - start
    pipeline_wall = time.perf_counter() - WALL0
    pipeline_cpu = time.process_time() - CPU0
    pipeline_peak = peak_rss_bytes()

    spectrum = planted_spectrum(args.paths, args.planted)
    ratios = {}
    for name, (lora_b, lora_a) in factors.items():
        if spectrum is not None and name in spectrum:
            ratios[name] = exact_ratio(summed[name], lora_b, lora_a, spectrum[name], r)

    result = {
        "method": "torch.svd_lowrank" if args.method == "torch" else "sklearn.randomized_svd",
        "rank": r,
        "layers": {name: list(g.shape) for name, g in summed.items()},
        "import_seconds": import_seconds,
        "load_sum_seconds": load_seconds,
        "svd_seconds": svd_seconds,
        "pipeline_seconds": pipeline_seconds,          # load + sum + SVD + factors
        "wall_seconds": pipeline_wall,                 # the same from interpreter start
        "cpu_seconds": pipeline_cpu,
        "peak_rss_bytes": pipeline_peak,               # before the fidelity check
        "ratios": ratios,
        "worst_ratio": max(ratios.values()) if ratios else None,
        "blas": blas_info(),
        "environment": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "versions": versions(),
    }
    write(result, args.json)


def versions():
    found = {"python": sys.version.split()[0], "numpy": np.__version__}
    for module in ("sklearn", "scipy", "safetensors", "torch"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def write(result, path):
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
