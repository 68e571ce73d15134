"""python -m services.gateway: the OpenAI-compatible HTTP gateway. Flags and AMUSD_* variables: `amusd-mq gateway
--help`."""
import sys

from amusd_mq.cli.main import main

main(["gateway", *sys.argv[1:]])
