"""CPT only: next-token CE on packed raw Korean rows until the plateau rule stops it.

    python jobs/cpt.py [--config PATH] [--set key=value ...] [--run-name NAME]
                      [--resume | --overwrite] [--force] [--address ADDR]

With no flags it runs the embedded demo's CPT stage on 2 local CPU workers and prints the stage table.
"""

import sys

from kcpt.train.commands import main

if __name__ == "__main__":
    sys.exit(main(cpt_only=True, description=__doc__))
