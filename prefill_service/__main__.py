import sys

from baton.worker_main import main

sys.exit(main("prefill"))
