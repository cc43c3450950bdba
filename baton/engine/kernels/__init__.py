"""baton's CPU kernels: C++ compiled on this machine for its own vector width (-march=native).

`linear.cpp`: the step's products by the weights (baton/engine/linear.py says when they run);
`attention.cpp`: a decode step's attention over each row's own tokens (baton/engine/runner.py);
`elementwise.cpp`: residual add + RMSNorm, SiLU-and-mul, RoPE (baton/engine/pointwise.py);
`argmax.cpp`: greedy sampling's choice, each row's argmax (baton/engine/sampler.py);
`layers.cpp`: a decode step's layers in one call, on the kernels above (baton/engine/cpu_layers.py).
`make install` builds them (`python -m baton.engine.kernels`) into the virtual environment, as an
installed package's files (elsewhere: torch's extension cache); otherwise the first use does, once.
Where they cannot be built (no C++ compiler) or `BATON_CPU_KERNELS=0` is set, torch's own ops run
instead, and the log says so once.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / f for f in ("bindings.cpp", "linear.cpp", "attention.cpp", "elementwise.cpp", "argmax.cpp",
                               "layers.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]    # OpenMP: at::parallel_for splits a matmul over torch's threads


def _build_name() -> str:
    """A name per CPU and per source: -march=native differs between machines that share a home, and a
    changed header must rebuild too (torch's loader hashes only the .cpp files)."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    digest = hashlib.sha1(cpu.encode())
    for path in sorted(HERE.glob("*.[ch]*")):
        digest.update(path.read_bytes())
    return f"baton_cpu_{digest.hexdigest()[:12]}"


def _build_root() -> Path:
    """The virtual environment's own folder when it can be written (a fresh venv builds afresh, and
    removing it removes the build), else torch's extension cache."""
    root = Path(sys.prefix) / "baton-kernels"
    if os.access(sys.prefix, os.W_OK):
        return root
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module (vector_bytes, pack, linear, decode_attention), or None where it cannot be
    had (logged once)."""
    if os.environ.get("BATON_CPU_KERNELS", "1") == "0":
        log.info("BATON_CPU_KERNELS=0: torch's CPU ops run the step")
        return None
    name = _build_name()
    try:
        from torch.utils.cpp_extension import load
        build_dir = _build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        built = build_dir / f"{name}.so"
        if built.exists():   # import it as it is: no rebuild check, no wait on a lock a killed build left
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir), verbose=False)
    except Exception as e:   # no compiler, no ninja, a read-only cache: serve with torch's ops
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("baton's CPU kernels could not be built (%s); torch's ops run the step", reason[:300])
        return None


def cpu_kernels_for(device, dtype) -> ModuleType | None:
    """The kernels where they apply, to tensors on a CPU in float32 or float64; else None."""
    import torch
    if device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    return cpu_kernels()
