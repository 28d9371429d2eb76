"""Sharded jobs through the real daemons, for Scripts/bench (--scale-out, --llama7b).

Scale-out: one layer, the same gradient as 1 whole file for 1 worker and as N row shards for N
workers (`lora-ga-bench shards`, the lora_ga.blocks convention), each run through
`lora-ga-coord` and N `lora-ga-worker` processes on 127.0.0.1. Model scale: a
Llama-2-7B-shaped job (224 linear layers, BF16) row-sharded over 2 workers.

Every process's CPU (user+sys) and peak RSS come from its own rusage (wait4), its anonymous
and file-backed resident memory from /proc/PID/status sampled while it runs (a worker's
mapped gradient file counts in its RSS but is page cache, not memory it allocated), and
bytes on the wire from each daemon's --summary-file (else the "MB sent" / "MB received" of
its final log line). Nothing assumes what the protocol sends.
"""
import json
import os
import re
import shutil
import subprocess
import threading
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets of the scale-out (4 row shards against one whole file).
PER_WORKER_CPU_BAR = 0.35     # each of 4 workers' CPU ≤ 0.35 × the single worker's
TOTAL_CPU_BAR = 1.25          # Σ workers' CPU ≤ 1.25 × the single worker's
COORDINATOR_FLAT_BAR = 1.2    # "flat": coordinator peak RSS with 4 workers ≤ 1.2 × with 1
RATIO_BAR = 1.01

LLAMA_KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
                "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
                "mlp.down_proj": (4096, 11008)}


def machine_busy_seconds():
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def proc_status(pid):
    """RssAnon, RssFile and VmHWM of a live process in bytes, or None once it is gone or a zombie."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    return values or None


class MemorySampler(threading.Thread):
    """Samples /proc/PID/status of the given processes until stopped; keeps each one's peaks."""

    def __init__(self, interval=0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.pids = {}
        self.peaks = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def add(self, name, pid):
        with self.lock:
            self.pids[name] = pid
            self.peaks[name] = {"RssAnon": 0, "RssFile": 0}

    def run(self):
        while not self.stopping.is_set():
            with self.lock:
                pids = dict(self.pids)
            for name, pid in pids.items():
                status = proc_status(pid)
                if status:
                    peak = self.peaks[name]
                    for key in ("RssAnon", "RssFile"):
                        peak[key] = max(peak[key], status.get(key, 0))
            self.stopping.wait(self.interval)

    def stop(self):
        self.stopping.set()
        self.join()


def wait_child(pid, deadline):
    """wait4 on one child with a deadline; returns (exit code, rusage) or (None, None) on timeout."""
    while True:
        finished, status, usage = os.wait4(pid, os.WNOHANG)
        if finished == pid:
            return os.waitstatus_to_exitcode(status), usage
        if time.monotonic() > deadline:
            return None, None
        time.sleep(0.05)


def last_log_number(path, pattern):
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return None
    matches = re.findall(pattern, text)
    return float(matches[-1]) if matches else None


def run_daemon_job(bin_dir, shard_dirs, adapter, logs, name, rank=None, timeout=3600, extra_coordinator=()):
    """One job: lora-ga-coord on 127.0.0.1 (port chosen by the kernel) and one lora-ga-worker per
    entry of `shard_dirs`. Returns the per-process figures, the job's wall time and how busy the
    rest of the machine was meanwhile."""
    os.makedirs(logs, exist_ok=True)
    base = os.path.join(logs, name)
    port_file = base + ".port"
    for path in (port_file,):
        if os.path.exists(path):
            os.remove(path)
    coordinator_summary = base + "-coordinator.json"
    coordinator_command = [os.path.join(bin_dir, "lora-ga-coord"), "--listen", "127.0.0.1:0", "--port-file", port_file,
                           "--workers", str(len(shard_dirs)), "--out", adapter, "--restart",
                           "--summary-file", coordinator_summary, *(["--rank", str(rank)] if rank else []), *extra_coordinator]
    sampler = MemorySampler()
    processes = {}   # name → (Popen, log path, summary path)
    busy_before, total_before = machine_busy_seconds()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    log_handles = []
    try:
        log = open(base + "-coordinator.log", "w")
        log_handles.append(log)
        coordinator = subprocess.Popen(coordinator_command, stdout=log, stderr=subprocess.STDOUT)
        processes["coordinator"] = (coordinator, base + "-coordinator.log", coordinator_summary)
        sampler.add("coordinator", coordinator.pid)
        sampler.start()
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if coordinator.poll() is not None:
                raise RuntimeError(f"lora-ga-coord exited {coordinator.returncode} before listening; see {base}-coordinator.log")
            if time.monotonic() > deadline:
                raise RuntimeError("lora-ga-coord did not listen in time")
            time.sleep(0.02)
        port = int(open(port_file).read().strip())
        for index, directory in enumerate(shard_dirs):
            worker_name = f"worker{index}"
            summary = f"{base}-{worker_name}.json"
            log = open(f"{base}-{worker_name}.log", "w")
            log_handles.append(log)
            command = [os.path.join(bin_dir, "lora-ga-worker"), "--connect", f"127.0.0.1:{port}", "--grads", directory,
                       "--id", worker_name, "--summary-file", summary]
            worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            processes[worker_name] = (worker, f"{base}-{worker_name}.log", summary)
            sampler.add(worker_name, worker.pid)
        with open(base + ".cmd", "w") as handle:
            handle.write(" ".join(coordinator_command) + "\n")
            for worker_name, (process, _, _) in processes.items():
                handle.write(" ".join(process.args) + "\n")
        results = {}
        for process_name, (process, log_path, summary_path) in processes.items():
            code, usage = wait_child(process.pid, deadline)
            if code is None:
                raise RuntimeError(f"{process_name} still running after {timeout} s; see {log_path}")
            process.returncode = code
            results[process_name] = {"exit": code, "cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime, "sys": usage.ru_stime,
                                     "rss_mb": usage.ru_maxrss * 1024 / 1e6, "log": log_path, "summary": summary_path}
            if process_name == "coordinator":
                results["wall"] = time.perf_counter() - start
    finally:
        for process, _, _ in processes.values():
            if process.returncode is None and process.poll() is None:
                process.kill()      # only the processes this function started, by their own handle
                process.wait()
        sampler.stop()
        for handle in log_handles:
            handle.close()
    busy_after, total_after = machine_busy_seconds()
    ours = sum(results[k]["cpu"] for k in processes)
    wall = time.perf_counter() - start
    failed = {k: results[k]["exit"] for k in processes if results[k]["exit"] != 0}
    if failed:
        tail = open(results["coordinator"]["log"], errors="replace").read()[-2000:]
        raise RuntimeError(f"daemon job {name} failed: exit codes {failed}; coordinator log tail:\n{tail}")
    for process_name in processes:
        entry = results[process_name]
        entry["rss_anon_mb"] = sampler.peaks[process_name]["RssAnon"] / 1e6
        entry["rss_file_mb"] = sampler.peaks[process_name]["RssFile"] / 1e6
        entry["bytes"], entry["bytes_source"] = process_bytes(entry["summary"], entry["log"], received=process_name == "coordinator")
    return {"processes": {k: results[k] for k in processes}, "wall": results["wall"], "job_wall": wall,
            "others_cores": max(0.0, ((busy_after - busy_before) - ours) / max(wall, 1e-9)),
            "machine_cores_busy": (busy_after - busy_before) / max(wall, 1e-9), "load_before": load_before, "load_after": os.getloadavg()[0]}


def process_bytes(summary_path, log_path, received):
    """Payload bytes of one daemon: its --summary-file, else its last 'done:' log line."""
    try:
        with open(summary_path) as handle:
            return json.load(handle)["bytes"], "summary-file"
    except (OSError, ValueError, KeyError):
        pass
    pattern = r"([0-9.]+) MB received" if received else r"([0-9.]+) MB sent"
    value = last_log_number(log_path, pattern)
    return (value * 1e6 if value is not None else None), "log"


def verify(lora_ga, adapter, paths, log_path):
    """`lora-ga verify` of an adapter against `paths`: per-layer ratios and the worst."""
    result = subprocess.run([lora_ga, "verify", "--adapter", adapter, *paths], capture_output=True, text=True)
    with open(log_path, "w") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"lora-ga verify exited {result.returncode}: {result.stderr[-1500:]}")
    layers = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+)\s+ratio ([0-9.]+)", result.stdout, re.M)}
    worst = re.search(r"^worst:\s*([0-9.eE+-]+)", result.stdout, re.M)
    return layers, (float(worst.group(1)) if worst else None)


def generate(bench_bin, arguments, log_path):
    """`lora-ga-bench shards …`: returns its JSON summary and its rusage."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([bench_bin, "shards", *arguments], stdout=subprocess.PIPE, stderr=log, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"lora-ga-bench shards exited {code}; see {log_path}")
    summary = json.loads(stdout)
    summary["peak_rss_mb"] = usage.ru_maxrss * 1024 / 1e6
    return summary, usage.ru_utime + usage.ru_stime


def meminfo_gb(key):
    """A /proc/meminfo figure in GB (page cache: "Cached")."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def free_bytes(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


# ---------------------------------------------------------------------------------------
# Scale-out

def scale_out(bin_dir, work, logs, note, shape="8192x28672", workers=(1, 2, 4), rank=None, repeat=2):
    """The same layer as 1 whole file for 1 worker and as N row shards for N workers, through the
    daemons, alternating the worker counts `repeat` times; each count's run with the least total
    worker CPU counts (other tenants of a 2-core machine only ever add CPU time)."""
    rows, cols = map(int, shape.lower().split("x"))
    data = os.path.join(work, "scale-out")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    needed = rows * cols * 4 * len(workers) * 1.05
    if free_bytes(work) < needed:
        raise RuntimeError(f"scale-out needs {needed / 1e9:.1f} GB free under {work}; {free_bytes(work) / 1e9:.1f} GB are")
    lora_ga = os.path.join(bin_dir, "lora-ga")
    try:
        note(f"scale-out: writing {shape} (planted spectrum) as {', '.join(f'{n} row shard(s)' for n in workers)}")
        summary, gen_cpu = generate(os.path.join(bin_dir, "lora-ga-bench"),
                                    ["--out", data, "--layer", shape, "--row-shards", *map(str, workers)], os.path.join(logs, "scale-out-shards.log"))
        os.sync()
        whole = os.path.join(data, "rows1", "w0") if 1 in workers else os.path.join(data, f"rows{min(workers)}")
        runs = {n: [] for n in workers}
        for attempt in range(repeat):
            for n in workers:
                adapter = os.path.join(data, f"adapter{n}")
                shard_dirs = [os.path.join(data, f"rows{n}", f"w{i}") for i in range(n)]
                note(f"scale-out: {n} worker(s) on {n} row shard(s) of {shape}, run {attempt + 1}/{repeat}")
                job = run_daemon_job(bin_dir, shard_dirs, adapter, logs, f"scale-out-{n}w-{attempt}", rank=rank)
                layers, worst = verify(lora_ga, adapter, [whole], os.path.join(logs, f"scale-out-{n}w-{attempt}-verify.txt"))
                job["ratio"] = worst
                job["report"] = read_json(os.path.join(adapter, "lora_ga_report.json"))
                runs[n].append(job)
                shutil.rmtree(adapter, ignore_errors=True)
        return {"shape": shape, "rank": rank, "workers": list(workers), "runs": runs, "generate_seconds": summary["seconds"],
                "generate_rss_mb": summary["peak_rss_mb"],
                "generate_cpu": gen_cpu, "file_bytes": rows * cols * 4}
    finally:
        shutil.rmtree(data, ignore_errors=True)


def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def worker_entries(job):
    return [v for k, v in job["processes"].items() if k.startswith("worker")]


def total_worker_cpu(job):
    return sum(w["cpu"] for w in worker_entries(job))


def render_scale_out(result, met):
    runs = {n: min(jobs, key=total_worker_cpu) for n, jobs in result["runs"].items()}
    mode = "/".join(sorted({l["mode"] for job in runs.values() for l in (job.get("report") or {}).get("layers", [])})) or "?"
    settings = next(((job.get("report") or {}).get("settings") or {} for job in runs.values()), {})
    rank = settings.get("lora", {}).get("rank", result.get("rank"))
    lines = ["### Scale-out: one layer as row shards through the daemons", "",
             f"One {result['shape'].replace('x', '×')} layer (F32, {result['file_bytes'] / 1e6:.0f} MB; planted spectrum s_i = i^-0.8 over rank 512, "
             f"written by `lora-ga-bench shards`, {result['generate_seconds']:.0f} s) as 1 whole file for 1 worker and as N row shards "
             f"(lora_ga.blocks) for N workers (generator peak RSS {result['generate_rss_mb']:.0f} MB); `lora-ga-coord` + N `lora-ga-worker` on 127.0.0.1, mode {mode}, r = {rank}. "
             f"Each worker count ran {len(next(iter(result['runs'].values())))}× alternating; the run with the least total worker CPU is shown. "
             "CPU: user+sys of each process (wait4 rusage); RSS: peak (rusage), anon: peak anonymous RSS sampled from /proc "
             "(a worker's RSS also counts its mapped gradient file); sent: payload bytes from each worker's --summary-file; "
             "ratio: `lora-ga verify` against the whole file. others: cores busy with other processes during the run (/proc/stat).", "",
             "| workers | wall s | CPU per worker s (max) | Σ worker CPU s | coordinator CPU s | coordinator peak RSS MB (anon) | worker peak RSS MB (anon) | sent per worker MB | ratio | others (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, job in sorted(runs.items()):
        workers = worker_entries(job)
        coordinator = job["processes"]["coordinator"]
        cpus = [w["cpu"] for w in workers]
        sent = [w["bytes"] / 1e6 for w in workers if w["bytes"] is not None]
        lines.append(f"| {n} | {job['wall']:.2f} | {' / '.join(f'{c:.2f}' for c in cpus)} ({max(cpus):.2f}) | {sum(cpus):.2f} | {coordinator['cpu']:.2f} | "
                     f"{coordinator['rss_mb']:.0f} ({coordinator['rss_anon_mb']:.0f}) | {max(w['rss_mb'] for w in workers):.0f} ({max(w['rss_anon_mb'] for w in workers):.0f}) | "
                     f"{' / '.join(f'{s:.1f}' for s in sent) or '–'} | {job['ratio']:.4f} | {job['others_cores']:.2f} |")
    all_runs = [job for jobs in result["runs"].values() for job in jobs]
    lines += ["", f"Load average (1 min) around these runs: {min(j['load_before'] for j in all_runs):.2f}–{max(j['load_after'] for j in all_runs):.2f}; "
              f"other processes kept {min(j['others_cores'] for j in all_runs):.2f}–{max(j['others_cores'] for j in all_runs):.2f} of the 2 cores busy.",
              "", "| target | value | goal | |", "|---|---|---|---|"]
    if 1 in runs:
        single = total_worker_cpu(runs[1])
        for n in sorted(runs):
            if n == 1:
                continue
            job = runs[n]
            per_worker = max(w["cpu"] for w in worker_entries(job)) / single
            total = total_worker_cpu(job) / single
            coordinator = job["processes"]["coordinator"]["rss_mb"] / runs[1]["processes"]["coordinator"]["rss_mb"]
            judged = n == 4
            verdict = met if judged else (lambda flag: "context")
            lines.append(f"| CPU per worker, {n} shards ÷ 1 whole file | {per_worker:.3f} × (max {max(w['cpu'] for w in worker_entries(job)):.2f} s vs {single:.2f} s) | "
                         f"≤ {PER_WORKER_CPU_BAR}{'' if judged else ' at 4'} | {verdict(per_worker <= PER_WORKER_CPU_BAR)} |")
            lines.append(f"| total worker CPU, {n} shards ÷ 1 whole file | {total:.3f} × ({total_worker_cpu(job):.2f} s vs {single:.2f} s) | "
                         f"≤ {TOTAL_CPU_BAR} | {verdict(total <= TOTAL_CPU_BAR)} |")
            lines.append(f"| coordinator peak RSS flat, {n} vs 1 worker | {coordinator:.2f} × ({job['processes']['coordinator']['rss_mb']:.0f} MB vs "
                         f"{runs[1]['processes']['coordinator']['rss_mb']:.0f} MB) | ≤ {COORDINATOR_FLAT_BAR} × (chosen bar) | {verdict(coordinator <= COORDINATOR_FLAT_BAR)} |")
    worst = max(job["ratio"] for job in runs.values())
    lines.append(f"| ratio, every run | worst {worst:.4f} | ≤ {RATIO_BAR} | {met(worst <= RATIO_BAR)} |")
    return lines


def scale_out_csv_rows(result):
    rows = []
    for n, jobs in result["runs"].items():
        for attempt, job in enumerate(jobs):
            for name, entry in job["processes"].items():
                rows.append({"section": "scale-out", "shape": result["shape"], "workers": n, "attempt": attempt, "process": name,
                             "wall": job["wall"], "cpu": entry["cpu"], "rss_mb": entry["rss_mb"], "rss_anon_mb": entry["rss_anon_mb"],
                             "bytes": entry["bytes"], "ratio": job["ratio"], "others_cores": job["others_cores"]})
    return rows


# ---------------------------------------------------------------------------------------
# Llama-2-7B-shaped job

def llama_layers(blocks, layers_per_block):
    return [(f"model.layers.{b}.{kind}.weight", *LLAMA_SHAPES[kind]) for b in range(blocks) for kind in LLAMA_KINDS[:layers_per_block]]


def llama7b(bin_dir, work, logs, note, blocks=32, layers_per_block=7, workers=2, rank=None, sample_blocks=None, timeout=3600):
    """A Llama-2-7B-shaped job: `blocks` × `layers_per_block` layers in BF16, row-sharded over
    `workers` workers through the daemons; the whole gradient is written only for the sampled
    blocks, which the adapter is verified against."""
    layers = llama_layers(blocks, layers_per_block)
    parameters = sum(r * c for _, r, c in layers)
    sample_blocks = sorted(set(sample_blocks if sample_blocks is not None else [0, blocks // 2, blocks - 1]))
    sampled = [l for l in layers if int(l[0].split(".")[2]) in sample_blocks]
    sample_parameters = sum(r * c for _, r, c in sampled)
    data = os.path.join(work, "llama7b")
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    needed = (parameters + sample_parameters) * 2 * 1.03 + 2e9
    available = free_bytes(work)
    if available < needed:
        raise RuntimeError(f"the 7B-shaped job needs {needed / 1e9:.1f} GB free under {work} (BF16 shards + the sampled layers whole); "
                           f"{available / 1e9:.1f} GB are; scale it down with --blocks / --layers-per-block")
    lora_ga = os.path.join(bin_dir, "lora-ga")
    pattern = r"^model\.layers\.(" + "|".join(map(str, sample_blocks)) + r")\."
    try:
        note(f"7B-shaped: writing {len(layers)} layers ({parameters / 1e9:.2f}e9 parameters, {parameters * 2 / 1e9:.1f} GB BF16) as "
             f"{workers} row shards, and blocks {sample_blocks} whole ({sample_parameters * 2 / 1e9:.2f} GB) for verify")
        summary, gen_cpu = generate(os.path.join(bin_dir, "lora-ga-bench"),
                                    ["--out", data, "--llama7b", "--blocks", str(blocks), "--layers-per-block", str(layers_per_block),
                                     "--dtype", "bf16", "--row-shards", str(workers), "--sample", pattern], os.path.join(logs, "llama7b-shards.log"))
        note(f"7B-shaped: written in {summary['seconds']:.0f} s; syncing")
        os.sync()
        shard_dirs = [os.path.join(data, f"rows{workers}", f"w{i}") for i in range(workers)]
        shard_bytes = [os.path.getsize(os.path.join(d, "grads.safetensors")) for d in shard_dirs]
        adapter = os.path.join(data, "adapter")
        note(f"7B-shaped: the job through lora-ga-coord + {workers} lora-ga-worker")
        cached = meminfo_gb("Cached")
        job = run_daemon_job(bin_dir, shard_dirs, adapter, logs, "llama7b", rank=rank, timeout=timeout)
        note(f"7B-shaped: done in {job['wall']:.0f} s; verifying {len(sampled)} sampled layers against their whole gradient")
        ratios, worst = verify(lora_ga, adapter, [os.path.join(data, "sample")], os.path.join(logs, "llama7b-verify.txt"))
        report = read_json(os.path.join(adapter, "lora_ga_report.json"))
        adapter_bytes = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
        return {"blocks": blocks, "layers_per_block": layers_per_block, "layers": len(layers), "parameters": parameters,
                "workers": workers, "job": job, "ratios": ratios, "worst": worst, "sample_blocks": sample_blocks,
                "generate_seconds": summary["seconds"], "generate_cpu": gen_cpu, "generate_rss_mb": summary["peak_rss_mb"],
                "page_cache_gb": cached, "shard_bytes": shard_bytes, "report": report,
                "adapter_bytes": adapter_bytes, "full": blocks == 32 and layers_per_block == 7}
    finally:
        shutil.rmtree(data, ignore_errors=True)


def fmt_gb(value):
    return "–" if value is None else f"{value:.1f} GB"


def render_llama7b(result, met):
    job = result["job"]
    coordinator = job["processes"]["coordinator"]
    workers = worker_entries(job)
    report = result.get("report") or {}
    mode = "/".join(sorted({l["mode"] for l in report.get("layers", [])})) or "?"
    rank = (report.get("settings") or {}).get("lora", {}).get("rank")
    f32_bytes = result["parameters"] * 4
    full_parameters = sum(r * c for _, r, c in llama_layers(32, 7))
    scale = "" if result["full"] else (f" — SCALED DOWN: {result['blocks']} blocks × {result['layers_per_block']} layers, not the full 32 × 7; "
                                       f"the full job's figures below are an extrapolation, not a measurement")
    subset = "" if result["layers_per_block"] == 7 else ", first %d of each block" % result["layers_per_block"]
    worker_rss = " / ".join("%.0f (%.0f)" % (w["rss_mb"], w["rss_anon_mb"]) for w in workers)
    worker_cpu = " / ".join("%.1f" % w["cpu"] for w in workers)
    worker_sent = " / ".join("%.0f" % (w["bytes"] / 1e6) if w["bytes"] is not None else "–" for w in workers)
    lines = [f"### Llama-2-7B-shaped job through the daemons{scale}", "",
             f"{result['layers']} linear layers ({result['blocks']} blocks of q, k, v, o 4096×4096, gate and up 11008×4096, down 4096×11008"
             f"{subset}): "
             f"{result['parameters']:,} parameters, BF16, row-sharded over {result['workers']} workers "
             f"(each worker one file holding its {100 // result['workers']} % of every layer's rows as lora_ga.blocks: "
             f"{' + '.join(f'{b / 1e9:.2f}' for b in result['shard_bytes'])} GB); planted spectrum i^-0.8 over rank 512 per layer "
             f"(`lora-ga-bench shards`, {result['generate_seconds']:.0f} s to write at {result['generate_rss_mb']:.0f} MB peak RSS: it streams). "
             f"Page cache when the job started: {fmt_gb(result.get('page_cache_gb'))} (the shards had just been written; a cold job reads them from disk). "
             f"Mode {mode}, r = {rank}. Ratio on blocks "
             f"{', '.join(map(str, result['sample_blocks']))} ({len(result['ratios'])} layers, every shape), "
             f"`lora-ga verify` against those layers' whole gradient.", "",
             "| figure | value |", "|---|---|",
             f"| wall time (coordinator start → adapter written) | {job['wall']:.1f} s ({job['wall'] / 60:.1f} min) |",
             f"| coordinator peak RSS (anon) | {coordinator['rss_mb']:.0f} MB ({coordinator['rss_anon_mb']:.0f} MB) |",
             f"| worker peak RSS (anon) | {worker_rss} MB |",
             f"| CPU (user+sys) | coordinator {coordinator['cpu']:.1f} s; workers {worker_cpu} s |",
             f"| bytes on the wire (payload sent per worker) | {worker_sent} MB "
             f"(coordinator received {coordinator['bytes'] / 1e6:.0f} MB; the shards are {sum(result['shard_bytes']) / 1e9:.2f} GB) |"
             if coordinator.get("bytes") is not None else "| bytes on the wire | – |",
             f"| ratio, sampled layers | worst {result['worst']:.4f} (best {min(result['ratios'].values()):.4f}) |" if result["ratios"] else "| ratio | – |",
             f"| adapter written | {result['adapter_bytes'] / 1e6:.0f} MB |",
             f"| the reference / PEFT path holds the whole gradient in F32 | {result['parameters']:,} × 4 B = {f32_bytes / 1e9:.1f} GB "
             f"({f32_bytes / max(coordinator['rss_mb'] * 1e6, 1):.0f} × the coordinator's peak, "
             f"{f32_bytes / max(max(w['rss_mb'] for w in workers) * 1e6, 1):.0f} × a worker's) |",
             f"| machine | load average {job['load_before']:.2f} → {job['load_after']:.2f}; other processes kept {job['others_cores']:.2f} of 2 cores busy |"]
    if not result["full"]:
        factor = full_parameters / result["parameters"]
        lines.append(f"| EXTRAPOLATED to the full 32 × 7 layers (× {factor:.1f} by parameters; not measured) | wall ≈ {job['wall'] * factor / 60:.0f} min; "
                     f"whole gradient in F32 {full_parameters * 4 / 1e9:.1f} GB |")
    lines += ["", "| layer (sampled) | ratio |", "|---|---|"] + [f"| {name} | {ratio:.4f} |" for name, ratio in result["ratios"].items()]
    if result["ratios"]:
        lines += ["", f"| target | value | goal | |", "|---|---|---|---|",
                  f"| ratio on the sampled layers | {result['worst']:.4f} | ≤ {RATIO_BAR} | {met(result['worst'] <= RATIO_BAR)} |",
                  f"| coordinator memory ≪ the whole gradient | {coordinator['rss_mb']:.0f} MB vs {f32_bytes / 1e6:.0f} MB | — | context |"]
    return lines


def llama7b_csv_rows(result):
    job = result["job"]
    return [{"section": "llama7b", "shape": f"{result['blocks']}x{result['layers_per_block']}", "workers": result["workers"], "attempt": 0,
             "process": name, "wall": job["wall"], "cpu": entry["cpu"], "rss_mb": entry["rss_mb"], "rss_anon_mb": entry["rss_anon_mb"],
             "bytes": entry["bytes"], "ratio": result["worst"], "others_cores": job["others_cores"]} for name, entry in job["processes"].items()]
