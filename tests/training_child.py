"""A training process for the store and watch() tests, run as a separate process.

usage: python tests/training_child.py LOGDIR RUN STEPS SLEEP_S COMMIT_EVERY

Trains the digits demo model with watch() and prints "step N" after every step, so the
parent knows how far it got before reading or killing it.
"""

import sys
import time

from collapsewatch.demo import DigitsRun, start_run


def main() -> None:
    logdir, run, steps, sleep, commit_every = sys.argv[1:6]
    trainer = start_run(
        DigitsRun("child", lr=0.05),
        logdir=logdir,
        run=run,
        commit_every=int(commit_every),
        commit_interval=60.0,
        on_collapse="ignore",
        every=1,
    )
    with trainer.watcher:
        for step in range(int(steps)):
            trainer.step()
            print(f"step {step}", flush=True)
            time.sleep(float(sleep))


if __name__ == "__main__":
    main()
