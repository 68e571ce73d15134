"""python -m services.draft: the draft service (flags and AMUSD_* variables as in `amusd-mq draft --help`)."""
import sys

from amusd_mq.cli import main

main(["draft", *sys.argv[1:]])
