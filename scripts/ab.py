"""Two revisions of gpuserve, measured in alternating pairs: did a change move a figure?

This machine's speed moves by 10-40% from one run to the next, often by more than the change
being measured, so one run of each revision decides nothing. Here each pair runs both
revisions within a minute, the order alternating from pair to pair (base first, then head
first), and each figure is read as the ratio within its pair: the report gives every pair's
ratio, their median, and in how many pairs the head did better.

    python scripts/ab.py 305576e                 # that commit against the working tree
    python scripts/ab.py 305576e cc4fc02 --model encoder --concurrency 8 --pairs 4

Each revision is checked out with `git worktree` into a temporary folder (removed after) and
served from there: `python -m gpuserve` on core 0 with one torch thread, wrk on core 1, the
benchmark's models and bodies (`bench.measure`). The working tree is served as it is,
uncommitted changes included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import bench

# (field in bench.measure's rows, label, scale to the unit shown, higher is better)
FIGURES: list[tuple[str, str, float, bool | None]] = [
    ("req_per_s", "req/s", 1.0, True),
    ("cpu_ms_per_req", "server CPU µs/request", 1000.0, False),
    ("p50_ms", "p50 ms", 1.0, False),
    ("p99_ms", "p99 ms", 1.0, False),
    ("mean_batch", "mean batch", 1.0, None),
]


def compare(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One line per figure over (base, head) pairs of rows: both revisions' values, the
    ratio head/base in each pair, their median, and how many pairs the head did better in
    (None for a figure with no better direction)."""
    lines = []
    for field, label, scale, higher_better in FIGURES:
        both = [(b.get(field), h.get(field)) for b, h in pairs]
        if not both or any(b is None or h is None for b, h in both):
            continue  # a figure some run could not read (no batch metrics, say)
        ratios = [h / b if b else float("nan") for b, h in both]
        better = None
        if higher_better is not None:
            better = sum((h > b) if higher_better else (h < b) for b, h in both)
        lines.append(
            {
                "figure": label,
                "base": [b * scale for b, _ in both],
                "head": [h * scale for _, h in both],
                "ratios": ratios,
                "median_ratio": statistics.median(ratios),
                "head_better": better,
            }
        )
    return lines


def markdown(concurrency: int, lines: list[dict[str, Any]]) -> str:
    """The comparison at one concurrency as a markdown table."""
    pairs = len(lines[0]["ratios"]) if lines else 0
    out = [
        f"c={concurrency}, {pairs} pairs",
        "",
        "| figure | base | head | head/base per pair | median | head better in |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for line in lines:
        better = "" if line["head_better"] is None else f"{line['head_better']} of {pairs}"
        out.append(
            f"| {line['figure']} | {_values(line['base'])} | {_values(line['head'])} "
            f"| {', '.join(f'{r:.2f}' for r in line['ratios'])} "
            f"| {line['median_ratio']:.3f} | {better} |"
        )
    return "\n".join(out)


def _values(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" if v >= 100 else f"{v:.2f}" for v in values)


def checkout(revision: str, into: Path) -> Path:
    """`revision` as a detached worktree at `into`."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(into), revision],
        cwd=bench.ROOT,
        check=True,
        capture_output=True,
    )
    return into


def remove(tree: Path) -> None:
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(tree)], cwd=bench.ROOT, capture_output=True
    )


def imported_from(tree: Path) -> Path:
    """Where a server started for `tree` imports gpuserve from: an editable install of
    another checkout would otherwise measure that checkout twice."""
    env = {"PYTHONPATH": str(tree)} if tree != bench.ROOT else {}
    found = subprocess.run(
        [sys.executable, "-c", "import gpuserve; print(gpuserve.__file__)"],
        cwd=tree,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(found).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="a git revision: the code before")
    parser.add_argument("head", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--model", choices=sorted(bench.MODELS), default="light")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.pairs < 1 or args.seconds <= 0:
        parser.error("--pairs must be at least 1 and --seconds positive")

    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuserve-ab-")))
        trees = {}
        for side, revision in (("base", args.base), ("head", args.head)):
            if revision is None:
                trees[side] = bench.ROOT
                continue
            trees[side] = checkout(revision, scratch / side)
            stack.callback(remove, trees[side])
        for side, tree in trees.items():
            if (found := imported_from(tree)) != tree.resolve():
                sys.exit(f"the {side} server would import gpuserve from {found}, not {tree}")
        path = bench.export_models(scratch / "models")[args.model]

        runs: dict[str, list[list[dict[str, Any]]]] = {"base": [], "head": []}
        for pair in range(args.pairs):
            order = ("base", "head") if pair % 2 == 0 else ("head", "base")
            for side in order:
                print(f"pair {pair + 1} of {args.pairs}: {side}", flush=True)
                runs[side].append(
                    bench.measure(
                        "gpuserve",
                        args.model,
                        path,
                        args.concurrency,
                        args.seconds,
                        tree=trees[side],
                        instances=False,
                    )
                )

    print(f"\n{args.model}: base {args.base}, head {args.head or 'the working tree'}\n")
    for index, concurrency in enumerate(args.concurrency):
        pairs = [(b[index], h[index]) for b, h in zip(runs["base"], runs["head"], strict=True)]
        print(markdown(concurrency, compare(pairs)), end="\n\n")


if __name__ == "__main__":
    main()
