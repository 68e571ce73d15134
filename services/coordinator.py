"""python -m services.coordinator: the coordinator service (flags and AMUSD_* variables as in `amusd-mq coordinator --help`)."""
import sys

from amusd_mq.cli import main

main(["coordinator", *sys.argv[1:]])
