"""`python -m baton.engine.kernels`: build the CPU kernels now (make install does), say where."""
import sys
import time

from baton.engine.kernels import cpu_kernels

t0 = time.monotonic()
module = cpu_kernels()
if module is None:
    sys.exit("baton's CPU kernels were not built (see the warning above); torch's ops will run the step")
print(f"baton's CPU kernels: {module.__file__} ({time.monotonic() - t0:.1f} s)")
