"""Another process appending to a run, one committed row at a time (for the live tests).

python -m tests.dashboard.grow_run PATH --rows 400 --every 0.05 [--collapse-at 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from collapsewatch.store import RunWriter
from tests.dashboard.runs import DIM, MARGIN, collapsed_event, metrics_frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--first", type=int, default=5, help="rows written at once first")
    parser.add_argument("--every", type=float, default=0.05)
    parser.add_argument("--collapse-at", type=int, default=None)
    args = parser.parse_args()
    frame = metrics_frame(range(args.rows), collapse_at=args.collapse_at, t0=time.time())
    writer = RunWriter(args.path, {"margin": MARGIN, "embedding_dim": DIM})
    writer.append_metrics(frame.iloc[: args.first])
    writer.commit()
    for i in range(args.first, args.rows):
        time.sleep(args.every)
        writer.append_metrics(frame.iloc[i : i + 1])
        if args.collapse_at is not None and i == args.collapse_at:
            writer.append_events([collapsed_event(i)])
        writer.commit()
    writer.close()


if __name__ == "__main__":
    main()
