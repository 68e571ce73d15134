"""python -m services.draft: the draft service. Flags and AMUSD_* variables: `amusd-mq draft --help`."""
import sys

from amusd_mq.cli.main import main

main(["draft", *sys.argv[1:]])
