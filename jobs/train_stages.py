"""The whole plan (CPT → stage 1 → stage 2 → stage 3) in one Ray Train run.

    python jobs/train_stages.py [--config PATH] [--stages a,b] [--set key=value ...] [--run-name NAME]
                                [--resume | --overwrite] [--force] [--address ADDR]

With no flags it runs the embedded demo plan on 2 local CPU workers (a few minutes), prints a per-stage
summary table and the run directory.
"""

import sys

from kcpt.train.commands import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
