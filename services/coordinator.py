"""python -m services.coordinator: the coordinator. Flags and AMUSD_* variables: `amusd-mq coordinator --help`."""
import sys

from amusd_mq.cli.main import main

main(["coordinator", *sys.argv[1:]])
