"""Tune stage 3 (mixture ratios, peak LR, KL β) with Ray Tune + Optuna, the dual-constraint gate as objective.

    python jobs/tune_stage3.py [--config PATH] [--num-samples N] [--max-concurrent N] [--storage URL]
        [--study-name NAME] [--experiment-dir DIR] [--resume | --overwrite] [--address ADDR] [--set key=value ...]

With no flags it starts a local Ray, makes (or reuses) the demo plan's CPT / stage-1 / stage-2 checkpoints and
tunes stage 3 on the embedded demo (minutes on 2 CPU cores), then prints the trial table and where results are.
An existing experiment needs ``--resume`` (continue it, e.g. after the driver died) or ``--overwrite``.
On a cluster: ``ray job submit --working-dir . -- python jobs/tune_stage3.py --config ...`` (docs/tuning.md).
"""

import sys

from kcpt.tune.commands import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
