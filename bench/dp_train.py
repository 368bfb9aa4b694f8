"""Benchmark: local DP training throughput (samples/s) against plain torch and default Opacus.

    .venv/bin/python bench/dp_train.py                # 2 models, 200 steps of batch 64, 5 repeats
    .venv/bin/python bench/dp_train.py --quick        # 40 steps, 2 repeats: a smoke run

Methods, on the same model, data, optimizer (Adam, lr 1e-3) and number of steps, in one process:

- `torch`: plain non-private torch; shuffled minibatches sliced from pre-built tensors.
- `opacus-hooks`: the minimal Opacus loop, `PrivacyEngine().make_private(...)` with its default
  per-sample gradient hooks over a `DataLoader(TensorDataset)`, Poisson sampling.
- `opacus-ghost`: the same loop with `grad_sample_mode="ghost"` (ghost clipping, two backward
  passes), the fastest exact Opacus mode on these models: shown to justify aipipe's choice.
- `aipipe`: `aipipe.models.training.train_local` with privacy.mode "dp" (exact one-pass clipping,
  Opacus' noise, Poisson batches sliced from tensors).

Every timed call is a whole local round as a node runs it (optimizer and privacy setup included),
σ = 1, clip = 1. Samples/s counts steps × batch size (the expected Poisson batch). Methods run
interleaved, one call each per repeat, so load from other processes hits them alike; the report
gives medians and their ratios. A separate row times drawing the Poisson batches alone, through
Opacus' DPDataLoader and by slicing pre-built tensors. aipipe memoises the round's ε (PRV costs
~0.1 s a call), so it is paid in the warm-up call, as once per study in a node process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import numpy as np
import opacus
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aipipe.models import build_model
from aipipe.models.training import train_local
from aipipe.study.blocks import ModelSpec, Privacy, Training

N = 10_000
SIGMA, CLIP, LR = 1.0, 1.0, 1e-3
MODELS = {
    "logistic 13→1": (13, ModelSpec(kind="logistic")),
    "mlp 64→256→256→1": (64, ModelSpec(kind="mlp", hidden=[256, 256])),
}
METHODS = ("torch", "opacus-hooks", "opacus-ghost", "aipipe")


def synthetic(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) + rng.normal(scale=0.5, size=N) > 0).astype(np.float32)
    return X, y


def run_torch(model: nn.Module, X: np.ndarray, y: np.ndarray, steps: int, batch: int) -> None:
    features, labels = torch.from_numpy(X), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    order, cursor = torch.randperm(N, generator=generator), 0
    for _ in range(steps):
        if cursor + batch > N:
            order, cursor = torch.randperm(N, generator=generator), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        optimizer.zero_grad()
        logits = model(features[idx]).squeeze(1)
        F.binary_cross_entropy_with_logits(logits, labels[idx]).backward()
        optimizer.step()


def run_opacus(
    model: nn.Module, X: np.ndarray, y: np.ndarray, steps: int, batch: int, mode: str
) -> None:
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion: Any = nn.BCEWithLogitsLoss()
    engine = PrivacyEngine()
    kwargs = {"criterion": criterion} if mode == "ghost" else {}
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=True,
        grad_sample_mode=mode,
        **kwargs,
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = private
    else:
        model, optimizer, loader = private
    done = 0
    while done < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb).squeeze(1), yb).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def run_aipipe(model: nn.Module, X: np.ndarray, y: np.ndarray, steps: int, batch: int) -> None:
    training = Training(local_steps=steps, batch_size=batch, lr=LR, optimizer="adam")
    privacy = Privacy(mode="dp", clip=CLIP, accountant="prv")
    train_local(model, X, y, training=training, privacy=privacy, noise_multiplier=SIGMA, seed=0)


def runner(method: str) -> Callable[[nn.Module, np.ndarray, np.ndarray, int, int], None]:
    if method == "torch":
        return run_torch
    if method == "aipipe":
        return run_aipipe
    mode = method.removeprefix("opacus-")
    return lambda model, X, y, steps, batch: run_opacus(model, X, y, steps, batch, mode)


def time_methods(
    d: int, spec: ModelSpec, steps: int, batch: int, repeats: int
) -> dict[str, list[float]]:
    X, y = synthetic(d)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for method in METHODS:  # warm-up: first-call costs (allocator, memoised ε) are not timed
        runner(method)(build_model(spec, d, seed=0), X, y, max(steps // 10, 2), batch)
    for _ in range(repeats):
        for method in METHODS:
            model = build_model(spec, d, seed=0)
            start = time.perf_counter()
            runner(method)(model, X, y, steps, batch)
            times[method].append(time.perf_counter() - start)
    return times


def time_sampling(steps: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds to draw `steps` Poisson batches of 64 features: DataLoader vs slicing."""
    X, y = (torch.from_numpy(a) for a in synthetic(64))
    loader = DataLoader(TensorDataset(X, y), batch_size=batch)
    dp_loader = opacus.data_loader.DPDataLoader.from_data_loader(loader)
    generator, q = torch.Generator().manual_seed(0), batch / N

    def via_loader() -> None:
        for i, _ in enumerate(zip(range(steps), dp_loader, strict=False)):
            del i

    def via_slicing() -> None:
        for _ in range(steps):
            idx = (torch.rand(N, generator=generator) < q).nonzero().squeeze(1)
            X[idx], y[idx]

    result = {}
    for name, draw in (("dataloader", via_loader), ("slicing", via_slicing)):
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            draw()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    return result


def summarise(times: dict[str, list[float]], steps: int, batch: int) -> dict[str, dict[str, Any]]:
    medians = {m: statistics.median(t) for m, t in times.items()}
    rows = {}
    for method, median in medians.items():
        rows[method] = {
            "seconds": times[method],
            "median_s": median,
            "samples_per_s": steps * batch / median,
            "slowdown_vs_torch": median / medians["torch"],
            "speedup_vs_opacus_hooks": medians["opacus-hooks"] / median,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/dp_train.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="40 steps, 2 repeats")
    args = parser.parse_args()
    steps, repeats = (40, 2) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and hook notices, once per call

    console = Console(width=110)
    table = Table(title=f"DP local training, n={N}, batch {args.batch_size}, {steps} steps")
    for column in ("model", "method", "samples/s", "× slower than torch", "× faster than Opacus"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    results: dict[str, Any] = {}
    for label, (d, spec) in MODELS.items():
        rows = summarise(
            time_methods(d, spec, steps, args.batch_size, repeats), steps, args.batch_size
        )
        results[label] = rows
        for method, row in rows.items():
            table.add_row(
                label,
                method,
                f"{row['samples_per_s']:,.0f}",
                f"{row['slowdown_vs_torch']:.2f}",
                f"{row['speedup_vs_opacus_hooks']:.2f}",
            )
    sampling = time_sampling(steps, args.batch_size, repeats)
    console.print(table)
    console.print(
        f"drawing {steps} Poisson batches: DPDataLoader {sampling['dataloader'] * 1e3:.1f} ms, "
        f"slicing tensors {sampling['slicing'] * 1e3:.1f} ms "
        f"({sampling['dataloader'] / sampling['slicing']:.1f}×)"
    )
    report = {
        "benchmark": "dp_train",
        "command": " ".join([".venv/bin/python bench/dp_train.py", *sys.argv[1:]]),
        "config": {
            "n": N,
            "steps": steps,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "noise_multiplier": SIGMA,
            "clip": CLIP,
            "lr": LR,
            "optimizer": "adam",
            "torch_threads": args.threads,
        },
        "environment": common.machine(torch=torch.__version__, opacus=opacus.__version__),
        "results": results,
        "sampling_s": sampling,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
