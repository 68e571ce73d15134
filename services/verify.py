"""python -m services.verify: the verify service (flags and AMUSD_* variables as in `amusd-mq verify --help`)."""
import sys

from amusd_mq.cli import main

main(["verify", *sys.argv[1:]])
