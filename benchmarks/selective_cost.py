"""What does training a set of layers really cost? One local training step vs the additive model.

    python benchmarks/selective_cost.py               # SmolLM2-135M (30 layers), ~5-10 min
    python benchmarks/selective_cost.py --quick       # tiny random Llama (8 layers), ~1-2 min
    python benchmarks/selective_cost.py --mode lora   # LoRA factors of the chosen layers instead

The selective-layer paper charges a site Σ_{l∈S} c_l for training the layer set S (an additive,
per-layer cost). But backpropagation to layer l must pass through every layer above it, so a
step's cost depends on the *lowest* selected layer: training layer 2 alone costs almost as much
as training layers 2..K−1. This script measures one step (the project's loss path:
``trainer._loss_sum``, then backward and AdamW) for

* suffixes S = {l >= m} and single layers S = {m}, for several m, and
* nothing trainable (the forward pass alone, F),

each in a fresh process (so memory high-water marks do not leak between configurations, with
``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors go back to the OS), and compares them with

* the additive model: t(S) = F + |S| · (t(all) − F) / K, memory(S) = |S| · memory(all) / K;
* a depth-aware model fitted to the same measurements: t(S) = F + a · (K − min S) + w · |S|
  (backprop depth plus per-layer weight-gradient work).

Columns: wall and CPU time per step (the minimum over --repeats steps after a warm-up step:
the machine is shared, and the minimum is the least disturbed); "activations": bytes
of the tensors autograd saves for backward (exact, from saved_tensors_hooks); "peak": the largest
RSS increase during the step (sampled every ms: activations, gradients, temporaries) plus the
optimizer state (AdamW: 2 x trainable x 4 bytes). Weights autograd keeps are not counted as
activations (they are in memory anyway). The batch is ``--batch`` sequences of
``--seq`` random tokens whose last 4 tokens are supervised; one torch thread by default, so CPU
time measures compute even when other jobs share the cores (wall time does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# one measurement (runs in its own process)
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples this process's RSS every ``period`` s in a thread; ``peak`` is the maximum seen."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(spec: dict) -> dict:
    import torch

    from flare_lora.components.data.prompts import IGNORE_INDEX
    from flare_lora.components.training.config import SiteConfig
    from flare_lora.components.training.lora import add_lora, set_trainable_layers
    from flare_lora.components.training.models import load_model_and_tokenizer
    from flare_lora.components.training.trainer import _loss_sum, set_threads

    set_threads(spec["threads"])
    model, _ = load_model_and_tokenizer(spec["model_dir"])
    layers = spec["layers"]
    if spec["mode"] == "lora":
        model = add_lora(model, SiteConfig(rank=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "gate_proj", "up_proj",
                                                                              "down_proj"]))
    trainable = set_trainable_layers(model, layers, spec["mode"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -4:] = input_ids[:, -4:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    model.train()

    def step():
        if not params:  # nothing trainable: the forward pass alone
            with torch.no_grad():
                _loss_sum(model, batch)
            return
        loss, n = _loss_sum(model, batch)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # bytes autograd keeps for backward (unique storages), from one extra forward
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:  # a weight kept for backward costs nothing extra
                saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    if params:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, n = _loss_sum(model, batch)
        del loss
    step()  # warm-up: allocates the optimizer state
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    before = _rss()
    with PeakSampler() as sampler:  # a separate step: the sampler thread would disturb the timings
        step()
    return {
        "layers": layers,
        "trainable": trainable,
        "seconds": min(times),
        "cpu_seconds": min(cpu),
        "times": times,
        "activation_bytes": sum(saved.values()),
        "step_peak_bytes": sampler.peak - before,
        "optimizer_bytes": 2 * 4 * trainable,
    }


# ---------------------------------------------------------------------------------------------
# orchestration and report
# ---------------------------------------------------------------------------------------------


def run_config(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec['layers']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_depth_model(rows: list[dict], k: int, forward: float, key: str = "seconds") -> tuple[float, float]:
    """Least squares for t − F = a·(K − min S) + w·|S| over the measured trainable sets."""
    import numpy as np

    x = np.array([[k - min(r["layers"]), len(r["layers"])] for r in rows], dtype=float)
    y = np.array([r[key] - forward for r in rows])
    (a, w), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(a), float(w)


def mb(n: float) -> str:
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama with 8 layers")
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--model", default=None, help="model dir (default: SmolLM2-135M, or the tiny model with --quick)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--starts", default=None, help="comma-separated m values (default: spread over the layers)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    if args.model:
        model_dir = args.model
    elif args.quick:
        from flare_lora.components.training.models import make_tiny_llama

        model_dir = "/tmp/flare_lora_cost_tiny8"
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            shared = ROOT.parent / "shared" / "data" / "smollm2-135m-instruct-q4_1"
            make_tiny_llama(model_dir, shared, hidden=128, layers=8)
    else:
        from flare_lora.components.training.models import resolve_model_dir

        model_dir = resolve_model_dir(None)
    with open(os.path.join(model_dir, "config.json")) as f:
        k = json.load(f)["num_hidden_layers"]
    default = {0, k // 2, k - 2} if args.quick else {0, k // 5, 2 * k // 5, 3 * k // 5, 4 * k // 5, k - 2}
    starts = [int(m) for m in args.starts.split(",")] if args.starts else sorted(default)
    base = {"model_dir": model_dir, "mode": args.mode, "batch": args.batch, "seq": args.seq,
            "repeats": args.repeats, "threads": args.threads}
    t_start = time.perf_counter()
    print(f"model {model_dir} (K={k}), mode {args.mode}, batch {args.batch} x {args.seq} tokens, "
          f"{args.threads} thread(s), best of {args.repeats} steps", flush=True)
    frozen = run_config({**base, "layers": []})
    rows = []
    for m in starts:
        for layers in (list(range(m, k)), [m]):
            if layers in [r["layers"] for r in rows]:
                continue
            row = run_config({**base, "layers": layers})
            rows.append(row)
            print(f"  measured S={_name(layers, k)}: {row['seconds']:.3f} s wall, {row['cpu_seconds']:.3f} s CPU", flush=True)
    full = next(r for r in rows if r["layers"] == list(range(k)))
    full_mem = full["step_peak_bytes"] + full["optimizer_bytes"]
    models = {}
    for key in ("seconds", "cpu_seconds"):
        forward = frozen[key]
        a, w = fit_depth_model(rows, k, forward, key)
        models[key] = (forward, (full[key] - forward) / k, a, w)
        print(f"\n{'wall' if key == 'seconds' else 'CPU'} time: forward only (nothing trainable) {forward:.3f} s/step; "
              f"additive model {models[key][1]:.3f} s per layer; depth-aware fit: a = {a:.3f} s per layer of "
              f"backprop depth, w = {w:.3f} s per trained layer")
    print(f"memory: additive model {mb(full_mem / k)} MB per layer\n")
    print("| trained layers S | \\|S\\| | trainable params | wall s/step | CPU s/step | additive model (CPU) s | error | "
          "depth-aware fit (CPU) s | activations MB | peak MB (step + optimizer) | additive model MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    forward, per_layer, a, w = models["cpu_seconds"]
    for r in sorted(rows, key=lambda r: (len(r["layers"]) == 1 and k > 1, r["layers"][0])):
        size = len(r["layers"])
        additive = forward + size * per_layer
        depth = forward + a * (k - min(r["layers"])) + w * size
        peak = r["step_peak_bytes"] + r["optimizer_bytes"]
        print(f"| {_name(r['layers'], k)} | {size} | {r['trainable'] / 1e6:.2f} M | {r['seconds']:.3f} | "
              f"{r['cpu_seconds']:.3f} | {additive:.3f} | {100 * (additive - r['cpu_seconds']) / r['cpu_seconds']:+.0f} % | "
              f"{depth:.3f} | {mb(r['activation_bytes'])} | {mb(peak)} | {mb(size * full_mem / k)} |")
    print(f"\n({time.perf_counter() - t_start:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"config": base, "k": k, "frozen": frozen, "rows": rows}, indent=1))
    return 0


def _name(layers: list[int], k: int) -> str:
    if len(layers) == 1:
        return f"{{{layers[0]}}}"
    return f"{{{layers[0]}..{k - 1}}}" if layers == list(range(layers[0], k)) else str(layers)


if __name__ == "__main__":
    raise SystemExit(main())
