"""Regenerate the README screenshot, ``docs/dashboard.png``.

    python -m tests.dashboard.screenshot                  # two synthetic demo runs
    python -m tests.dashboard.screenshot --logdir runs/   # your own runs

Run from a checkout (it is test tooling, not part of the package). Needs Playwright's Python
package and a Chromium (``/usr/bin/chromium``, or ``$COLLAPSEWATCH_CHROMIUM``). The
demo runs are synthetic but shaped like real ones: a batch-hard run whose loss/margin climbs
to 1.000 as its mean pairwise distance falls from ~0.5 to ~0.002 around step 60 (with the
detector's warning and collapsed events), and a healthy scaled run whose loss goes to 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from collapsewatch.store import Event, RunWriter
from tests.browser import CHROMIUM, CHROMIUM_ARGS, serve_in_thread

DIM, CLASSES, PER_CLASS, STEPS = 32, 10, 40, 300
# Dense around the collapse, so the slider shows the clusters shrinking step by step.
SNAPSHOT_STEPS = (0, 15, 30, 36, 42, 48, 54, 60, 90, 120, 180, 240, 299)
# The README shot shows step 42: mid-collapse, clusters at a fraction of their size.
DEMO_SLIDER_INDEX = 4
WAIT_MS = 120_000  # an upper bound only: every wait ends as soon as its condition holds
# Every plot drawn from its latest figure: no Dash callback pending, plotly's layout and
# data in place, no transition running.
SETTLED = """() => {
  if (document.querySelector('[data-dash-is-loading="true"]')) return false;
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  return plots.length > 0 && plots.every(gd => gd._fullLayout && gd._fullData
    && !(gd._transitionData && gd._transitionData._inTransition));
}"""


def _smooth_step(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(t - centre) / width))


def _clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = rng.normal(0, 0.35, size=(CLASSES, DIM))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    noise = rng.normal(0, 1, size=(CLASSES * PER_CLASS, DIM))
    return centres, labels, noise


def write_collapsing_run(logdir: Path, name: str = "batchhard-lr0.1", seed: int = 0) -> Path:
    """A batch-hard run that collapses around step 60 and stays collapsed."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS, dtype=float)
    margin = 0.2
    fall = _smooth_step(t, 42, 4.5)  # 0 → 1 as the embeddings contract
    mpd = (0.5 - 0.498 * fall) * np.exp(rng.normal(0, 0.04, STEPS))
    mpd[:25] *= np.linspace(0.85, 1.0, 25)  # a brief rise before the fall
    ratio = 0.86 + 0.14 * fall + rng.normal(0, 0.025, STEPS) * (1 - fall)
    ratio = np.where(fall > 0.995, 1.0 - rng.uniform(0, 2e-4, STEPS), ratio)
    hard = 0.32 + 0.66 * fall + rng.normal(0, 0.02, STEPS) * (1 - fall)
    easy = np.clip(0.28 * (1 - fall) + rng.normal(0, 0.02, STEPS) * (1 - fall), 0, 1)
    semi = np.clip(1 - hard - easy, 0, 1)
    std = (1 / math.sqrt(DIM)) * (0.92 - 0.88 * fall) * np.exp(rng.normal(0, 0.02, STEPS))
    rank = np.full(STEPS, np.nan)
    rank[::10] = (
        1.2 + 21 * (1 - fall[::10]) + rng.normal(0, 0.4, len(rank[::10])) * (1 - fall[::10])
    )
    frame = _frame(t, margin, ratio, mpd, hard, semi, easy, std, rank)
    path = logdir / f"{name}.cwrun"
    writer = _writer(
        path, frame, {"lr": 0.1, "optimizer": "SGD", "batch_size": 64, "mining": "batch_hard"}
    )
    peak = float(np.nanmax(mpd))
    warn, onset = 52, 63
    writer.append_events(
        [
            Event(
                step=warn,
                kind="warning",
                state="warning",
                message=(
                    f"Mean pairwise distance is down to {mpd[warn]:.3g} "
                    f"({mpd[warn] / peak:.0%} of its peak) and loss/margin is "
                    f"{ratio[warn]:.3f}: the embeddings are contracting."
                ),
                suggestion="Keep an eye on it; if it keeps falling, lower the learning rate.",
                evidence={
                    "loss_margin_ratio": float(ratio[warn]),
                    "mean_pairwise_distance": float(mpd[warn]),
                    "peak_mean_pairwise_distance": peak,
                },
                time=float(frame["time"].iloc[warn]),
            ),
            Event(
                step=onset,
                kind="collapsed",
                state="collapsed",
                message=(
                    "Embedding collapse: every input maps to about one point (mean pairwise "
                    f"distance {mpd[onset]:.2g}, {mpd[onset] / peak:.1%} of its peak) and the "
                    "batch-hard loss sits at the margin."
                ),
                suggestion=(
                    "Lower the learning rate (÷10) or warm it up; start with batch-all or "
                    "semi-hard mining before batch-hard; L2-normalise the embeddings; make "
                    "sure batches hold several samples per class (P×K sampling)."
                ),
                evidence={
                    "loss_margin_ratio": float(ratio[onset]),
                    "mean_pairwise_distance": float(mpd[onset]),
                    "peak_mean_pairwise_distance": peak,
                    "embedding_variance": float(frame["embedding_variance"].iloc[onset]),
                    "since_step": 58,
                },
                time=float(frame["time"].iloc[onset]),
            ),
        ]
    )
    centres, labels, noise = _clusters(rng)
    anchor = rng.normal(0, 0.3, DIM)
    for step in SNAPSHOT_STEPS:
        scale = mpd[step] / 0.5
        x = anchor + scale * (centres[labels] + 0.12 * noise)
        writer.add_snapshot(step, x.astype(np.float32), labels.astype(np.int64))
    writer.close("running")
    return path


def write_healthy_run(logdir: Path, name: str = "scaled-batchhard-lr0.01", seed: int = 1) -> Path:
    """A healthy run with scaled (L2-normalised) embeddings: loss → 0, distance ≈ 1.26."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS, dtype=float)
    margin = 0.2
    learn = 1 - np.exp(-t / 70)
    ratio = np.clip(0.92 * (1 - learn) + 0.015 + rng.normal(0, 0.03, STEPS) * (1 - learn), 0, None)
    mpd = (0.95 + 0.31 * learn) * np.exp(rng.normal(0, 0.01, STEPS))
    easy = np.clip(0.25 + 0.68 * learn + rng.normal(0, 0.02, STEPS), 0, 1)
    hard = np.clip(0.35 * (1 - learn) + 0.01 + rng.normal(0, 0.01, STEPS), 0, 1)
    semi = np.clip(1 - easy - hard, 0, 1)
    std = (1 / math.sqrt(DIM)) * (0.94 + 0.04 * learn) * np.exp(rng.normal(0, 0.005, STEPS))
    rank = np.full(STEPS, np.nan)
    rank[::10] = 19 + 8 * learn[::10] + rng.normal(0, 0.3, len(rank[::10]))
    frame = _frame(t, margin, ratio, mpd, hard, semi, easy, std, rank, normalised=True)
    path = logdir / f"{name}.cwrun"
    writer = _writer(
        path, frame, {"lr": 0.01, "optimizer": "AdamW", "batch_size": 64, "scaled": True}
    )
    centres, labels, noise = _clusters(rng)
    for step in SNAPSHOT_STEPS:
        x = centres[labels] + (0.3 - 0.22 * learn[step]) * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        writer.add_snapshot(step, x.astype(np.float32), labels.astype(np.int64))
    writer.close("finished")
    return path


def _writer(path: Path, frame: pd.DataFrame, config: dict) -> RunWriter:
    """A run file holding ``frame``'s metrics, as a batch-hard training would write it."""
    writer = RunWriter(
        path,
        {
            "margin": float(frame["margin"].iloc[0]),
            "embedding_dim": DIM,
            "model_class": "ResNet18Embedder",
            "loss_class": "BatchHardTripletLoss",
            "world_size": 1,
            "config": config,
        },
    )
    writer.append_metrics(frame)
    return writer


def _frame(
    t: np.ndarray,
    margin: float,
    ratio: np.ndarray,
    mpd: np.ndarray,
    hard: np.ndarray,
    semi: np.ndarray,
    easy: np.ndarray,
    std: np.ndarray,
    rank: np.ndarray,
    normalised: bool = False,
) -> pd.DataFrame:
    n = len(t)
    variance = mpd**2 / (2 * DIM)
    # Class geometry on the rank steps, shaped by how spread the unit vectors are (1 ≈ the
    # healthy 1/√D, 0 = one point): tight classes and a uniform sphere while healthy.
    spread = np.where(np.isfinite(rank), np.clip(std * math.sqrt(DIM), 0, 1), np.nan)
    return pd.DataFrame(
        {
            "step": t.astype(np.int64),
            "time": time.time() - 2.0 * (n - t),
            "loss": ratio * margin,
            "margin": margin,
            "loss_margin_ratio": ratio,
            "embedding_variance": variance,
            "mean_pairwise_distance": mpd,
            # Same-class pairs are the close ones while the classes are apart; collapsed,
            # every pair is as close.
            "mean_between_class_distance": mpd * (1 + 0.1 * np.clip(std * math.sqrt(DIM), 0, 1)),
            "frac_easy": easy,
            "frac_semihard": semi,
            "frac_hard": hard,
            "frac_positive_loss": np.clip(1 - easy, 0, 1),
            "hardest_positive_mean": mpd * 0.9,
            "hardest_negative_mean": mpd * 0.9 + (1 - ratio) * margin,
            "embedding_norm_mean": np.ones(n) if normalised else 1.2 + mpd,
            "std_of_l2_normalized": std,
            "effective_rank": rank,
            "nonfinite_count": np.zeros(n),
            "embedding_dim": float(DIM),
            "batch_size": 64.0,
            "num_valid_triplets": 64.0,
            "num_classes": np.where(np.isfinite(rank), float(CLASSES), np.nan),
            "within_class_variance_ratio": 1 - 0.7 * spread,
            "alignment": 0.6 * spread,
            "uniformity": -3.2 * spread,
        }
    )


def write_demo_runs(logdir: Path) -> list[Path]:
    """The two demo runs of the README screenshot, written into ``logdir``."""
    logdir.mkdir(parents=True, exist_ok=True)
    return [write_collapsing_run(logdir), write_healthy_run(logdir)]


def screenshot(
    logdir: Path,
    out: Path,
    *,
    width: int = 1400,
    height: int = 1000,
    chromium: str = CHROMIUM,
    slider_index: int | None = None,
) -> Path:
    """Serve ``logdir``, open it in headless Chromium and save a PNG of the page.

    ``slider_index`` moves the embedding slider to that snapshot (default: the latest).
    """
    from collapsewatch.dashboard import create_app
    from playwright.sync_api import expect, sync_playwright

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on the console
    app = create_app(logdir, interval_ms=1000)
    with serve_in_thread(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(WAIT_MS)
            page.goto(url)
            # Wait on what the picture needs, never on a fixed time: a busy machine only
            # waits longer. The panels and the scatter have drawn real data first.
            expect(page.locator("#cw-panels .legend .traces").first).to_be_attached(timeout=WAIT_MS)
            expect(page.locator("#cw-embed-graph .scatterlayer .point").first).to_be_attached(
                timeout=WAIT_MS
            )
            caption = page.locator("#cw-embed-caption")
            expect(caption).to_contain_text("Step", timeout=WAIT_MS)
            if slider_index is not None:
                before = caption.inner_text()
                page.locator("#cw-embed-slider [role=slider]").focus()
                page.keyboard.press("Home")
                for _ in range(slider_index):
                    page.keyboard.press("ArrowRight")
                expect(caption).not_to_have_text(before, timeout=WAIT_MS)
            page.wait_for_function(SETTLED)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write demo runs (unless --logdir is given) and take the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="screenshot these runs instead of demo runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("dashboard.png"),
        help="PNG to write (default: %(default)s)",
    )
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args(argv)
    if args.logdir is not None:
        print(screenshot(args.logdir, args.out, chromium=args.chromium))
        return
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_runs(Path(tmp) / "runs")
        # Serve it as "runs" from inside the temporary directory: the header shows the log
        # directory as given, and a temporary path would look odd in the README.
        here = Path.cwd()
        os.chdir(tmp)
        try:
            print(
                screenshot(
                    Path("runs"), out, chromium=args.chromium, slider_index=DEMO_SLIDER_INDEX
                )
            )
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
