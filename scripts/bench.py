"""Side by side: the raw forward-pass limit, a naive FastAPI server, LitServe and gpuserve.

Two reference models are built here (nothing downloaded): a light MLP, where HTTP and JSON
dominate, and a transformer encoder, where the model dominates. Every server runs on core 0 with
one torch thread; wrk runs on core 1. All in one run, so the figures compare; the machine is
noisy, so compare within a run only, and use --repeats for the spread.

    python scripts/bench.py                      # the whole comparison, writes bench-results/
    python scripts/bench.py --quick              # 3 s rows, two concurrencies: a smoke run
    python scripts/bench.py --protocols          # the demo model over /predict, v2 and gRPC
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _loadgen import (
    batch_totals,
    free_port,
    main_thread_cpu_seconds,
    mean_batch,
    run_wrk,
    start,
    stop,
    tree_cpu_seconds,
)

from gpuserve.spec import ModelSpec, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
VOCAB = 1000
SEQ = 64


class LightMLP(torch.nn.Module):
    """256 floats in, three hidden layers of 1024 with GELU, 10 out."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = 256
        for _ in range(3):
            layers += [torch.nn.Linear(width, 1024), torch.nn.GELU()]
            width = 1024
        layers.append(torch.nn.Linear(width, 10))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(torch.nn.Module):
    """64 token ids in; d_model 256, 4 layers, 4 heads; mean-pooled to 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 256)
        self.position = torch.nn.Parameter(torch.randn(SEQ, 256) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(hidden.mean(dim=1))


MODELS: dict[str, dict[str, Any]] = {
    "light": {
        "build": LightMLP,
        "example": lambda n: torch.randn(n, 256),
        "input": TensorSpec(name="x", shape=(256,), dtype="float32"),
        "body": lambda: [round(0.01 * i, 2) for i in range(256)],
    },
    "encoder": {
        "build": Encoder,
        "example": lambda n: torch.randint(0, VOCAB, (n, SEQ)),
        "input": TensorSpec(name="tokens", shape=(SEQ,), dtype="int64", min=0, max=VOCAB - 1),
        "body": lambda: [(7 * i) % VOCAB for i in range(SEQ)],
    },
}


def export_models(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entry in MODELS.items():
        torch.manual_seed(0)
        model = entry["build"]().eval()
        path = out / f"{name}.pt2"
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.export.export(
                model, (entry["example"](2),), dynamic_shapes=({0: batch},), strict=False
            )
        torch.export.save(program, str(path))
        ModelSpec(
            name=name, input=entry["input"], output=TensorSpec(name="y", shape=(10,))
        ).to_file(path.with_suffix(".json"))
        paths[name] = path
    return paths


def raw_limit(path: Path, name: str, seconds: float, rounds: int = 4) -> dict[int, float]:
    """Samples/s of the model called in-process on one core and one thread, by batch size.

    `seconds` per size, split into `rounds` that go through every size in turn: each size's
    median round, so that a slow or fast moment of the machine lands on every size alike
    rather than making one size the "best".
    """
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    module = torch.export.load(str(path)).module()
    sizes = (1, 8, 32, 64, 128)
    measured: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.inference_mode():
        inputs = {size: MODELS[name]["example"](size) for size in sizes}
        for x in inputs.values():
            module(x)
        for _ in range(rounds):
            for size, x in inputs.items():
                calls, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds / rounds:
                    module(x)
                    calls += 1
                measured[size].append(calls * size / (time.perf_counter() - started))
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {size: statistics.median(rates) for size, rates in measured.items()}


def server_command(
    kind: str, path: Path, port: int, integer: bool, grpc_port: int = 0
) -> tuple[list[str], str, dict[str, str]]:
    flag = ["--integer-inputs"] if integer else []
    base = f"http://127.0.0.1:{port}"
    if kind == "naive":
        script = str(SCRIPTS / "bench_servers" / "naive_server.py")
        return (
            [sys.executable, script, "--model", str(path), "--port", str(port), *flag],
            f"{base}/health",
            {},
        )
    if kind.startswith("litserve"):
        timeout = "0.005" if kind.endswith("5ms") else "0.001"
        script = str(SCRIPTS / "bench_servers" / "litserve_server.py")
        command = [
            sys.executable,
            script,
            "--model",
            str(path),
            "--port",
            str(port),
            "--timeout",
            timeout,
        ]
        return [*command, *flag], f"{base}/health", {}
    env = {
        "GPUSERVE_MODEL__PATH": str(path),
        "GPUSERVE_MODEL__MAX_BATCH_SIZE": "32",
        "GPUSERVE_LOG_LEVEL": "warning",
        "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000",
    }
    command = [sys.executable, "-m", "gpuserve", "serve", "--port", str(port), "--device", "cpu"]
    command += ["--grpc-port", str(grpc_port)]
    return command, f"{base}/health/ready", env


def measure(
    kind: str,
    name: str,
    path: Path,
    concurrencies: list[int],
    seconds: float,
    *,
    tree: Path = ROOT,
    instances: bool = True,
) -> list[dict[str, Any]]:
    """One server of `kind` serving model `name` from `path`, under wrk at each concurrency.

    `tree`: the checkout whose gpuserve serves (`scripts/ab.py` passes another revision's).
    `instances`: for gpuserve's light model, also a run of 64-row `instances` bodies.
    """
    port = free_port()
    command, ready, env = server_command(kind, path, port, integer=name == "encoder")
    if tree != ROOT:
        env = {**env, "PYTHONPATH": str(tree)}
    body = json.dumps({"inputs": MODELS[name]["body"]()})
    url = f"http://127.0.0.1:{port}"
    server = start(command, ready, env, tree)
    rows = []
    try:
        run_wrk(f"{url}/predict", body, 8, 2)  # warm-up, not recorded
        plans: list[tuple[str, int, str, int]] = [("single", c, body, 1) for c in concurrencies]
        if instances and kind == "gpuserve" and name == "light":
            rows64 = json.dumps({"instances": [MODELS[name]["body"]()] * 64})
            plans.append(("instances64", 4, rows64, 64))
        for mode, concurrency, payload, per_request in plans:
            before, cpu_before = batch_totals(url), tree_cpu_seconds(server.pid)
            loop_before = main_thread_cpu_seconds(server.pid)
            result = run_wrk(f"{url}/predict", payload, concurrency, seconds)
            cpu = tree_cpu_seconds(server.pid) - cpu_before
            loop = main_thread_cpu_seconds(server.pid) - loop_before
            after = batch_totals(url)
            result.update(
                server=kind,
                model=name,
                mode=mode,
                concurrency=concurrency,
                samples_per_s=result["req_per_s"] * per_request,
                cpu_ms_per_req=cpu / max(1, result["requests"]) * 1e3,
                mean_batch=mean_batch(before, after),
                # The event loop's share of the server's CPU; the rest is the forward pass.
                # LitServe's loops live in several processes: not comparable, left out.
                loop_share=None if kind.startswith("litserve") else loop / max(cpu, 1e-9),
            )
            rows.append(result)
            print(
                f"{kind:>12} {name:>7} {mode:>11} c={concurrency:<4} "
                f"{result['req_per_s']:8.0f} req/s "
                f"p50 {result['p50_ms']:7.2f} ms p99 {result['p99_ms']:7.2f} ms "
                f"err {result['errors'] + result['non_2xx']}",
                flush=True,
            )
    finally:
        stop(server)
    return rows


def median_raw(measured: list[dict[int, float]]) -> dict[int, float]:
    """The raw limit at each batch size: the median of its measurements."""
    return {size: statistics.median(m[size] for m in measured) for size in measured[0]}


def best(rows: list[dict[str, Any]], **match: Any) -> float:
    values = [r["samples_per_s"] for r in rows if all(r[k] == v for k, v in match.items())]
    return max(values) if values else 0.0


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (server, model, mode, concurrency): medians, with the spread of req/s."""
    merged: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run:
            key = (row["server"], row["model"], row["mode"], row["concurrency"])
            merged.setdefault(key, []).append(row)
    out = []
    for group in merged.values():
        row = dict(group[0])
        for field in ("req_per_s", "samples_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req"):
            row[field] = statistics.median(r[field] for r in group)
        if row.get("loop_share") is not None:
            row["loop_share"] = statistics.median(r["loop_share"] for r in group)
        row["req_per_s_spread"] = [round(r["req_per_s"]) for r in group]
        row["errors"] = sum(r["errors"] + r["non_2xx"] for r in group)
        out.append(row)
    return out


def report(
    rows: list[dict[str, Any]],
    raw: dict[str, dict[int, float]],
    raw_runs: dict[str, list[dict[int, float]]],
    out: Path,
) -> str:
    lines = []
    for name in MODELS:
        raw_best = max(raw[name].values())
        lines.append(f"\n### {name}\n")
        lines.append(
            f"raw limit (samples/s, one core; median of {len(raw_runs[name])} measurements, "
            "before and after the servers of each run): "
            + ", ".join(f"batch {b}: {v:.0f}" for b, v in raw[name].items())
        )
        lines.append("")
        lines.append(
            "raw best of each measurement, in order: "
            + ", ".join(f"{max(m.values()):.0f}" for m in raw_runs[name])
        )
        lines.append("")
        lines.append(
            "| server | mode | c | req/s (runs) | samples/s | % of raw best | p50 ms | p99 ms "
            "| server CPU ms/req | event loop % of CPU | mean batch | errors |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            if r["model"] != name:
                continue
            batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] is not None else "n/a"
            loop = f"{100 * r['loop_share']:.1f}%" if r.get("loop_share") is not None else "n/a"
            lines.append(
                f"| {r['server']} | {r['mode']} | {r['concurrency']} "
                f"| {r['req_per_s']:.0f} ({', '.join(map(str, r['req_per_s_spread']))}) "
                f"| {r['samples_per_s']:.0f} | {100 * r['samples_per_s'] / raw_best:.0f}% "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_ms_per_req']:.3f} | {loop} "
                f"| {batch} "
                f"| {r['errors']} |"
            )
        ours = {
            c: best(rows, server="gpuserve", model=name, mode="single", concurrency=c)
            for c in (1, 32)
        }
        naive = {
            c: best(rows, server="naive", model=name, mode="single", concurrency=c) for c in (1, 32)
        }
        lit = max(
            best(rows, server=k, model=name, mode="single")
            for k in ("litserve-5ms", "litserve-1ms")
        )
        lines.append("")
        lines.append(
            f"- gpuserve at c=32: {ours[32]:.0f} samples/s = "
            f"{ours[32] / raw_best:.2f}x the raw best"
        )
        if naive[32]:
            lines.append(f"- gpuserve / naive at c=32: {ours[32] / naive[32]:.2f}x")
        if lit:
            lines.append(f"- gpuserve at c=32 / LitServe's best: {ours[32] / lit:.2f}x")
        p50 = {
            k: next(
                (
                    r["p50_ms"]
                    for r in rows
                    if r["server"] == k
                    and r["model"] == name
                    and r["concurrency"] == 1
                    and r["mode"] == "single"
                ),
                0.0,
            )
            for k in ("gpuserve", "naive")
        }
        if p50["naive"]:
            lines.append(
                f"- p50 at c=1: gpuserve {p50['gpuserve']:.2f} ms, naive {p50['naive']:.2f} ms"
            )
        inst = best(rows, server="gpuserve", model=name, mode="instances64")
        if inst:
            lines.append(
                f"- instances of 64 rows: {inst:.0f} samples/s = "
                f"{inst / raw_best:.2f}x the raw best"
            )
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    return text


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the `bench` extra brings it; the tables are written already
        print("no plot: matplotlib is not installed (pip install '.[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, name in enumerate(MODELS):
        for kind in sorted({r["server"] for r in rows}):
            points = sorted(
                (r["concurrency"], r["req_per_s"], r["p99_ms"])
                for r in rows
                if r["server"] == kind and r["model"] == name and r["mode"] == "single"
            )
            if not points:
                continue
            cs, rps, p99 = zip(*points, strict=True)
            axes[0][col].plot(cs, rps, marker="o", label=kind)
            axes[1][col].plot(cs, p99, marker="o", label=kind)
        axes[0][col].set_title(f"{name}: throughput")
        axes[1][col].set_title(f"{name}: p99 latency")
        axes[0][col].set_ylabel("req/s")
        axes[1][col].set_ylabel("p99 ms")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--servers", nargs="+", default=["naive", "litserve-5ms", "litserve-1ms", "gpuserve"]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--protocols",
        action="store_true",
        help="instead: the demo model at c=32 (or the first --concurrency given) over /predict "
        "JSON, v2 HTTP JSON, v2 HTTP binary and gRPC raw contents",
    )
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="instead: gpuserve with each of these worker counts, the demo model over "
        "/predict JSON at c=32 (or the first --concurrency given)",
    )
    parser.add_argument(
        "--spread",
        action="store_true",
        help="with --workers: let the server use every core instead of core 0 alone",
    )
    parser.add_argument(
        "--device", default="cpu", help="with --workers: the servers' device (cuda on a GPU)"
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="with --workers: each count above 1 also with one engine process for every worker",
    )
    parser.add_argument(
        "--gil-free",
        action="store_true",
        help="with --workers: the model spends 2 ms a batch with the GIL released, as a GPU does",
    )
    args = parser.parse_args()
    if args.protocols:
        protocols(args)
        return
    if args.workers:
        workers(args)
        return
    if args.quick:
        args.seconds, args.concurrency = 3.0, [1, 32]
    started = time.monotonic()
    paths = export_models(args.out / "models")
    raw_seconds = min(2.0, args.seconds / 4)
    # The machine's speed drifts over minutes, so the raw limit is measured right before and
    # right after each model's servers, in every repeat, rather than once at the start.
    raw_runs: dict[str, list[dict[int, float]]] = {name: [] for name in paths}
    runs = []
    for _ in range(args.repeats):
        run: list[dict[str, Any]] = []
        for name, path in paths.items():
            raw_runs[name].append(raw_limit(path, name, raw_seconds))
            for kind in args.servers:
                run += measure(kind, name, path, args.concurrency, args.seconds)
            raw_runs[name].append(raw_limit(path, name, raw_seconds))
            print(json.dumps({name: raw_runs[name][-2:]}), flush=True)
        runs.append(run)
    raw = {name: median_raw(measured) for name, measured in raw_runs.items()}
    rows = median_rows(runs)
    (args.out / "results.json").write_text(
        json.dumps({"raw": raw, "raw_runs": raw_runs, "rows": rows, "runs": runs}, indent=1)
    )
    print(report(rows, raw, raw_runs, args.out))
    plot(rows, args.out)
    print(
        f"\nwrote {args.out}/report.md, results.json, bench.png "
        f"in {time.monotonic() - started:.0f} s"
    )


def protocols(args: argparse.Namespace) -> None:
    from _protocols import measure_protocols, protocols_report
    from _workers import demo_model

    model = demo_model()
    concurrency = args.concurrency[0] if args.concurrency != [1, 8, 32, 128] else 32
    rows = measure_protocols(model, concurrency, args.seconds, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    text = protocols_report(rows, concurrency)
    (args.out / "protocols.json").write_text(json.dumps(rows, indent=1))
    (args.out / "protocols.md").write_text(text + "\n")
    print(text)


def workers(args: argparse.Namespace) -> None:
    from _workers import demo_model, measure_workers, workers_report

    concurrency = args.concurrency[0] if args.concurrency != [1, 8, 32, 128] else 32
    model = demo_model()
    rows = measure_workers(
        model,
        args.workers,
        concurrency,
        args.seconds,
        args.repeats,
        args.spread,
        args.device,
        args.engine,
        args.gil_free,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    text = workers_report(rows, concurrency, args.spread, args.gil_free)
    suffix = ("-spread" if args.spread else "") + ("-gil-free" if args.gil_free else "")
    (args.out / f"workers{suffix}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"workers{suffix}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
