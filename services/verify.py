"""python -m services.verify: the verify service. Flags and AMUSD_* variables: `amusd-mq verify --help`."""
import sys

from amusd_mq.cli.main import main

main(["verify", *sys.argv[1:]])
