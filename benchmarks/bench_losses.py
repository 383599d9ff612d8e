"""Loss benchmark: collapsewatch's triplet losses against the seed reference and PML.

Times forward + backward (fp32) of batch-all and batch-hard triplet losses on random
embeddings, for

* ours: ``collapsewatch.losses.BatchAllTripletLoss`` / ``BatchHardTripletLoss``, timed with
  ``check_finite=False`` (the sync-free configuration) with and without statistics;
* the seed's reference implementation (``seed_reference.py``), which builds an N×N×N mask;
* pytorch-metric-learning's ``TripletMarginLoss`` (all triplets, and with ``BatchHardMiner``)
  when it is installed.

Labels are either 10 random classes or P×K batches (B/8 classes of 8 samples, shuffled).
Reference cases whose N³ mask / triplet indices would not fit in memory are skipped from an
up-front estimate instead of being tried. Results go to stdout (``--markdown`` for the table
in docs/benchmarks.md) and, with ``--json``, to a file.

Run it as a script from the repository root::

    python benchmarks/bench_losses.py --device cpu --quick
    python benchmarks/bench_losses.py --markdown --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor

from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss

if __package__:  # python -m benchmarks.bench_losses
    from benchmarks import seed_reference
else:  # python benchmarks/bench_losses.py: this folder is sys.path[0]
    import seed_reference

try:
    import pytorch_metric_learning
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner

    PML_VERSION: str | None = pytorch_metric_learning.__version__
except ImportError:
    PML_VERSION = None

MARGIN = 0.2
K = 8
"""Samples per class of the P×K batches."""
NUM_CLASSES = 10
"""Classes of the "10 random classes" batches."""
GIB = 1024**3
MIB = 1024**2

LossFn = Callable[[Tensor, Tensor], Tensor]
Mining = Literal["batch_all", "batch_hard"]
LabelMode = Literal["classes", "pk"]
LABEL_TITLES: dict[str, str] = {"classes": "10 random classes", "pk": f"P×K, K={K}"}
MINING_TITLES: dict[str, str] = {"batch_all": "Batch-all", "batch_hard": "Batch-hard"}


# --------------------------------------------------------------------------- memory models


def num_valid_triplets(labels: Tensor) -> int:
    """Σ over classes of n_c (n_c − 1) (N − n_c): the rows of the references' index tensors."""
    counts = torch.bincount(labels - labels.min()).to(torch.float64)
    n = float(labels.numel())
    return int((counts * (counts - 1) * (n - counts)).sum().item())


def estimate_seed_batch_all(labels: Tensor) -> int:
    """Peak bytes of the seed's batch-all: the N³ bool mask while ``nonzero`` writes M×3 int64
    indices, then per-triplet float32 distances, terms and their gradients (~20 B/triplet on
    top of the indices measured on CPU, budgeted 24; the CUDA index backward also sorts the
    indices, so 48 there)."""
    n, m = labels.numel(), num_valid_triplets(labels)
    per_triplet = 48 if labels.is_cuda else 24
    return max(n**3 + 24 * m, (24 + per_triplet) * m) + 16 * n * n


def estimate_pml_batch_all(labels: Tensor) -> int:
    """Peak bytes of PML's all-triplets TripletMarginLoss. Below 2³¹ mask elements it builds
    an N³ uint8 mask and ``torch.where``s it like the seed; above it loops over anchors and
    concatenates the index pieces (2× the M×3 int64 indices at once). Its per-triplet chain
    (distances, margins, relu, filter, gradients) is a little longer than the seed's."""
    n, m = labels.numel(), num_valid_triplets(labels)
    per_triplet = 56 if labels.is_cuda else 28
    indices = n**3 + 24 * m if n**3 < torch.iinfo(torch.int32).max else 48 * m
    return max(indices, (24 + per_triplet) * m) + 16 * n * n


def estimate_quadratic(labels: Tensor) -> int:
    """A generous bound for the O(N²) losses: a few dozen bytes per pair."""
    n = labels.numel()
    return 64 * n * n


# --------------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Impl:
    """One measured implementation: ``make()`` builds its (embeddings, labels) → loss."""

    key: str
    family: Literal["ours", "seed", "pml"]
    mining: Mining
    title: str
    make: Callable[[], LossFn]
    estimate: Callable[[Tensor], int] = estimate_quadratic

    @property
    def reference(self) -> bool:
        """References run fewer repeats and are skipped when they would not fit in memory."""
        return self.family != "ours"


def _ours(cls: type[BatchAllTripletLoss | BatchHardTripletLoss], stats: bool) -> LossFn:
    # check_finite=False: no host sync, the configuration a training step would time.
    return cls(margin=MARGIN, statistics=stats, check_finite=False)


def _pml_batch_all() -> LossFn:
    return TripletMarginLoss(margin=MARGIN, distance=LpDistance(normalize_embeddings=False))


def _pml_batch_hard() -> LossFn:
    distance = LpDistance(normalize_embeddings=False)
    miner = BatchHardMiner(distance=distance)
    loss = TripletMarginLoss(margin=MARGIN, distance=distance)
    return lambda e, y: loss(e, y, miner(e, y))


def _seed_batch_all() -> LossFn:
    return lambda e, y: seed_reference.triplet_loss_batch_all(e, y, MARGIN)


def _seed_batch_hard() -> LossFn:
    return lambda e, y: seed_reference.triplet_loss_batch_hard(e, y, MARGIN)


def implementations(families: Sequence[str]) -> list[Impl]:
    """The implementations of the requested families (PML only if installed)."""
    impls = [
        Impl("ours_ba", "ours", "batch_all", "ours", lambda: _ours(BatchAllTripletLoss, False)),
        Impl(
            "ours_ba_stats",
            "ours",
            "batch_all",
            "ours + stats",
            lambda: _ours(BatchAllTripletLoss, True),
        ),
        Impl(
            "seed_ba",
            "seed",
            "batch_all",
            "seed reference",
            _seed_batch_all,
            estimate_seed_batch_all,
        ),
        Impl("pml_ba", "pml", "batch_all", "PML", _pml_batch_all, estimate_pml_batch_all),
        Impl("ours_bh", "ours", "batch_hard", "ours", lambda: _ours(BatchHardTripletLoss, False)),
        Impl(
            "ours_bh_stats",
            "ours",
            "batch_hard",
            "ours + stats",
            lambda: _ours(BatchHardTripletLoss, True),
        ),
        Impl("seed_bh", "seed", "batch_hard", "seed reference", _seed_batch_hard),
        Impl("pml_bh", "pml", "batch_hard", "PML", _pml_batch_hard),
    ]
    if PML_VERSION is None:
        impls = [impl for impl in impls if impl.family != "pml"]
    return [impl for impl in impls if impl.family in families]


# --------------------------------------------------------------------------- inputs


def make_labels(mode: LabelMode, size: int, generator: torch.Generator) -> Tensor:
    """10 random classes, or B/K classes of K samples each in a random order."""
    if mode == "classes":
        return torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    if size % K:
        raise ValueError(f"P×K labels need B divisible by {K}, got B={size}")
    labels = torch.arange(size // K).repeat_interleave(K)
    return labels[torch.randperm(size, generator=generator)]


def make_batch(mode: LabelMode, size: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Standard-normal (B, D) fp32 embeddings and labels; the same for every implementation."""
    generator = torch.Generator().manual_seed(size * 31 + (mode == "pk"))
    embeddings = torch.randn(size, dim, generator=generator)
    labels = make_labels(mode, size, generator)
    return embeddings.to(device), labels.to(device)


# --------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: kineto logs two lines on every profiler start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class AllocationPeak:
    """Peak bytes held through torch's CPU allocator over a ``with`` block.

    Torch has no ``max_memory_allocated`` for CPU, and RSS hides what glibc recycles, so this
    replays the profiler's allocation / free events (internal workspaces included) in time
    order. The profiler slows the block down: use it on untimed warm-up runs only.
    ``peak`` stays None where the profiler's event API is unavailable.
    """

    def __init__(self) -> None:
        self.peak: int | None = None
        self._profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )

    def __enter__(self) -> AllocationPeak:
        with _quiet_stderr():
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        with _quiet_stderr():
            self._profile.__exit__(None, None, None)
        try:
            events = self._profile.profiler.kineto_results.events()  # type: ignore[union-attr]
            changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        except AttributeError:  # a torch without the kineto results API
            return
        running = peak = 0
        for _, nbytes in changes:
            running += nbytes
            peak = max(peak, running)
        self.peak = peak


CONTENDED_CORES = 0.1
"""Other processes using more than this many cores make a CPU timing suspect."""


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuContention:
    """How many cores *other* processes kept busy over a ``with`` block.

    The machine's busy time (/proc/stat, 10 ms ticks) minus this process's CPU time, divided
    by the wall time. On a shared 2-core machine another job halves our speed; this tells.
    """

    def __init__(self) -> None:
        self.other_cores: float | None = None

    def __enter__(self) -> CpuContention:
        self._start = (_machine_busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
        start_busy, start_own, start_wall = self._start
        if busy is None or start_busy is None:
            return
        other = (busy - start_busy) - (own - start_own)
        # /proc/stat counts 10 ms ticks: forgive two of them and judge at least 0.5 s of wall
        # time, so that a 5 ms case is not flagged for one stray tick.
        self.other_cores = max(other - 0.02, 0.0) / max(wall - start_wall, 0.5)


def wait_for_idle(max_wait_s: float) -> None:
    """Sleep until other processes use under CONTENDED_CORES for 2 s, at most ``max_wait_s``."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        with CpuContention() as probe:
            time.sleep(2.0)
        if probe.other_cores is None or probe.other_cores < CONTENDED_CORES:
            return


@dataclass
class Result:
    """One (labels, B, implementation) measurement."""

    labels: str
    size: int
    impl: str
    status: Literal["ok", "skipped", "oom", "error"]
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    peak_kind: str | None = None
    estimate_bytes: int | None = None
    loss: float | None = None
    note: str = ""
    other_cores: float | None = None
    """CPU cores other processes kept busy on average while this case ran (CPU only)."""
    attempts: int = 1

    @property
    def contended(self) -> bool:
        return self.other_cores is not None and self.other_cores > CONTENDED_CORES


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: LossFn, base: Tensor, labels: Tensor, device: torch.device) -> tuple[float, float]:
    """One forward + backward on a fresh leaf; (milliseconds, loss value)."""
    embeddings = base.detach().clone().requires_grad_(True)
    _synchronize(device)
    start = time.perf_counter()
    loss = fn(embeddings, labels)
    loss.backward()
    _synchronize(device)
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, float(loss.detach())


def measure(
    impl: Impl,
    base: Tensor,
    labels: Tensor,
    *,
    repeats: int,
    warmup: int,
    budget_s: float,
) -> tuple[list[float], float, int | None, str | None]:
    """Warm up, then time ``repeats`` steps (references: fewer if the budget runs out).

    Returns (times in ms, loss, peak bytes, what the peak measures).
    """
    device = base.device
    fn = impl.make()
    peak: int | None = None
    kind: str | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    # On CPU the first warm-up measures memory (the profiler would perturb timings).
    tracker = AllocationPeak() if device.type == "cpu" else None
    with tracker or contextlib.nullcontext():
        first_ms, loss = _step(fn, base, labels, device)
    if tracker is not None and tracker.peak is not None:
        peak, kind = tracker.peak, "peak CPU allocator bytes (profiler memory events)"
    for _ in range(warmup - 1):
        first_ms, loss = _step(fn, base, labels, device)
    if impl.reference:
        # The references take up to seconds a step: cap their repeats to the time budget.
        repeats = max(1, min(repeats, int(budget_s * 1e3 / max(first_ms, 1e-3))))
    times = []
    for _ in range(repeats):
        elapsed, loss = _step(fn, base, labels, device)
        times.append(elapsed)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
        kind = "torch.cuda.max_memory_allocated"
    return times, loss, peak, kind


def memory_limit(device: torch.device, cpu_limit_gb: float) -> int:
    """Bytes a reference case may be estimated to need before it is skipped."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    limit = int(cpu_limit_gb * GIB)
    available = _mem_available()
    return min(limit, int(0.8 * available)) if available else limit


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_case(
    impl: Impl,
    mode: str,
    base: Tensor,
    labels: Tensor,
    args: argparse.Namespace,
) -> Result:
    """Measure one case, or record why it was skipped / failed."""
    device = base.device
    size = base.shape[0]
    estimate = impl.estimate(labels)
    result = Result(mode, size, impl.key, "ok", estimate_bytes=estimate)
    if impl.reference:
        limit = memory_limit(device, args.cpu_mem_limit_gb)
        if estimate > limit:
            result.status = "skipped"
            result.note = f"needs ~{estimate / GIB:.1f} GB > {limit / GIB:.1f} GB limit"
            return result
    for attempt in range(args.retries + 1):
        if attempt:
            # Someone else's job shared our cores: let it finish, then measure again.
            wait_for_idle(args.idle_wait_s)
        contention = CpuContention() if device.type == "cpu" else contextlib.nullcontext()
        try:
            with contention:
                times, loss, peak, kind = measure(
                    impl,
                    base,
                    labels,
                    repeats=args.repeats,
                    warmup=1 if impl.reference else args.warmup,
                    budget_s=args.ref_budget_s,
                )
        except torch.cuda.OutOfMemoryError:
            result.status, result.note = "oom", "out of memory"
            break
        except RuntimeError as error:
            # The references hit torch limits (e.g. nonzero on > 2³¹ elements) before memory.
            if not impl.reference:
                raise
            result.status, result.note = "error", str(error).splitlines()[0][:120]
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        other = contention.other_cores if isinstance(contention, CpuContention) else None
        if attempt and result.other_cores is not None and (other or 0) >= result.other_cores:
            continue  # keep the less disturbed earlier measurement
        result.times_ms = [round(t, 4) for t in times]
        result.median_ms = statistics.median(times)
        result.peak_bytes, result.peak_kind, result.loss = peak, kind, loss
        result.other_cores, result.attempts = other, attempt + 1
        if not result.contended:
            break
    return result


# --------------------------------------------------------------------------- sanity check


def check_agreement(mode: LabelMode, size: int, dim: int, device: torch.device) -> list[str]:
    """Raise if ours and the seed (and PML's all-triplets loss) disagree at size ``size``.

    Batch-hard is compared only on P×K labels: the seed counts anchors without a positive
    (hardest positive 0), ours leaves them out. PML's batch-hard averages only the anchors
    with a positive loss, a third definition, so it is not compared.
    """
    embeddings, labels = make_batch(mode, size, dim, device)
    pairs: list[tuple[str, LossFn, LossFn]] = [
        (
            "batch-all vs seed",
            BatchAllTripletLoss(margin=MARGIN),
            lambda e, y: seed_reference.triplet_loss_batch_all(e, y, MARGIN),
        )
    ]
    if mode == "pk":
        pairs.append(
            (
                "batch-hard vs seed",
                BatchHardTripletLoss(margin=MARGIN),
                lambda e, y: seed_reference.triplet_loss_batch_hard(e, y, MARGIN),
            )
        )
    if PML_VERSION is not None:
        pairs.append(("batch-all vs PML", BatchAllTripletLoss(margin=MARGIN), _pml_batch_all()))
    lines = []
    for name, ours, reference in pairs:
        expected = float(reference(embeddings, labels))
        got = float(ours(embeddings, labels))
        line = f"{LABEL_TITLES[mode]}, B={size}, {name}: ours {got:.6f}, reference {expected:.6f}"
        if not math.isclose(got, expected, rel_tol=1e-4):
            raise AssertionError(f"loss mismatch: {line}")
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- reporting


def device_description(device: torch.device) -> str:
    """GPU name, or CPU model with core and torch thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _format_cell(result: Result | None) -> str:
    if result is None:
        return "—"
    if result.status != "ok":
        return {"skipped": "skipped", "oom": "OOM", "error": "error"}[result.status] + (
            f" ({result.note})" if result.status != "oom" else ""
        )
    assert result.median_ms is not None
    text = f"{result.median_ms:.3g} ms" if result.median_ms < 100 else f"{result.median_ms:.0f} ms"
    if result.peak_bytes is not None:
        megabytes = result.peak_bytes / MIB
        text += f" · {megabytes:.0f} MiB" if megabytes >= 1 else " · <1 MiB"
    return text + (" †" if result.contended else "")


def _speedup(reference: Result | None, ours: Result | None) -> str:
    if reference is None or ours is None or reference.median_ms is None or not ours.median_ms:
        return "—"
    ratio = reference.median_ms / ours.median_ms
    return f"{ratio:.2g}×" if ratio < 10 else f"{ratio:.0f}×"


def tables(results: list[Result], impls: list[Impl]) -> list[tuple[str, list[list[str]]]]:
    """One (title, rows) table per label mode and mining; the first row is the header."""
    by_key = {(r.labels, r.size, r.impl): r for r in results}
    out = []
    for mode in dict.fromkeys(r.labels for r in results):
        sizes = sorted({r.size for r in results if r.labels == mode})
        for mining in ("batch_all", "batch_hard"):
            columns = [impl for impl in impls if impl.mining == mining]
            if not columns:
                continue
            prefix = "ours_ba" if mining == "batch_all" else "ours_bh"
            seed_key = "seed_ba" if mining == "batch_all" else "seed_bh"
            have_seed = any(impl.key == seed_key for impl in columns)
            header = ["B", *(impl.title for impl in columns)]
            if have_seed:
                header.append("speed-up vs seed (ours / + stats)")
            rows = [header]
            for size in sizes:
                row = [str(size), *(_format_cell(by_key.get((mode, size, i.key))) for i in columns)]
                if have_seed:
                    seed = by_key.get((mode, size, seed_key))
                    row.append(
                        f"{_speedup(seed, by_key.get((mode, size, prefix)))} / "
                        f"{_speedup(seed, by_key.get((mode, size, prefix + '_stats')))}"
                    )
                rows.append(row)
            out.append((f"{MINING_TITLES[mining]}, {LABEL_TITLES[mode]}", rows))
    return out


def render(rows: list[list[str]], markdown: bool) -> str:
    """Aligned columns, as a markdown table (right-aligned numbers) or plain text."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))
        if index == 0:
            rule = ["-" * (w - 1) + ":" for w in widths] if markdown else ["-" * w for w in widths]
            lines.append(("| " + " | ".join(rule) + " |") if markdown else "  ".join(rule))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="batch sizes (default 128…16384 on GPU, …2048 on CPU)"
    )
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--labels", choices=["classes", "pk", "both"], default="both")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=["ours", "seed", "pml"],
        default=["ours", "seed", "pml"],
        help="implementation families to time",
    )
    parser.add_argument("--repeats", type=int, help="timed steps per case (default 20 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (ours)")
    parser.add_argument(
        "--ref-budget-s",
        type=float,
        default=15.0,
        help="time budget per reference case; caps its repeats (at least 1)",
    )
    parser.add_argument(
        "--cpu-mem-limit-gb",
        type=float,
        default=6.0,
        help="skip CPU reference cases estimated above this (also ≤ 80%% of MemAvailable)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="CPU: re-measure a case up to this often when other processes shared the cores "
        "(default 2, 0 with --quick)",
    )
    parser.add_argument(
        "--idle-wait-s",
        type=float,
        help="CPU: before the run and each retry, wait up to this long for the other "
        "processes to go idle (default 60, 0 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="B in 128 512, ours and the seed reference only, 5 repeats (the demo)",
    )
    parser.add_argument("--json", metavar="PATH", help="save raw results here")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    on_gpu = args.device.type == "cuda"
    if args.quick:
        args.sizes = args.sizes or [128, 512]
        args.impls = [f for f in args.impls if f != "pml"]
        args.repeats = args.repeats or 5
        # The demo must stay short: report contention, do not wait it out.
        args.retries = 0 if args.retries is None else args.retries
        args.idle_wait_s = 0.0 if args.idle_wait_s is None else args.idle_wait_s
    if args.sizes is None:
        top = 16384 if on_gpu else 2048
        args.sizes = [2**k for k in range(7, top.bit_length())]
    if args.repeats is None:
        args.repeats = 20 if on_gpu else 10
    args.retries = 2 if args.retries is None else args.retries
    args.idle_wait_s = 60.0 if args.idle_wait_s is None else args.idle_wait_s
    if args.labels == "pk" or args.labels == "both":
        bad = [s for s in args.sizes if s % K]
        if bad:
            parser.error(f"P×K labels need sizes divisible by {K}: {bad}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device: torch.device = args.device
    modes: list[LabelMode] = ["classes", "pk"] if args.labels == "both" else [args.labels]
    impls = implementations(args.impls)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"device: {device_description(device)}",
        f"torch {torch.__version__}, python {platform.python_version()}, {now}",
        f"forward+backward, fp32, D={args.dim}, margin={MARGIN}; median of {args.repeats} "
        f"steps after {args.warmup} warm-up (references: 1 warm-up, repeats capped to "
        f"~{args.ref_budget_s:g} s a case)",
        "ours: check_finite=False (no host sync); '+ stats' also computes TripletStatistics",
    ]
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # Other work on the machine shows up directly in CPU timings: record it.
        header.append("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if PML_VERSION is None:
        header.append("pytorch-metric-learning not installed: PML columns skipped")
    elif "pml" in args.impls:
        header.append(f"pytorch-metric-learning {PML_VERSION}")
    for line in header:
        print(line, flush=True)

    if "seed" in args.impls or "pml" in args.impls:
        for mode in modes:
            for line in check_agreement(mode, min(args.sizes), args.dim, device):
                print("agreement ok:", line, flush=True)

    if device.type == "cpu":
        wait_for_idle(args.idle_wait_s)
    results: list[Result] = []
    for mode in modes:
        for size in sorted(args.sizes):
            base, labels = make_batch(mode, size, args.dim, device)
            for impl in impls:
                result = run_case(impl, mode, base, labels, args)
                results.append(result)
                busy = (
                    ""
                    if result.other_cores is None
                    else f"  (others: {result.other_cores:.2f} cores)"
                )
                print(
                    f"{LABEL_TITLES[mode]:>17}  B={size:<6d} {impl.key:<14} "
                    f"{_format_cell(result)}{busy}",
                    flush=True,
                )

    print()
    for title, rows in tables(results, impls):
        print(f"### {title}\n" if args.markdown else f"{title}:")
        print(render(rows, args.markdown))
        print()
    contended = [r for r in results if r.contended]
    if contended:
        print(
            f"† {len(contended)} case(s) ran while other processes kept more than "
            f"{CONTENDED_CORES} cores busy (after {args.retries} retries): those timings are "
            "inflated.\n"
        )
    if args.json:
        payload = {
            "device": device_description(device),
            "torch": torch.__version__,
            "pytorch_metric_learning": PML_VERSION,
            "date": now,
            "header": header,
            "args": {
                k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()
            },
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as out:
            json.dump(payload, out, indent=1)
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
