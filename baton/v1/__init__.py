"""Generated gRPC stubs of the baton.v1 protos (built by `make protos`, never committed)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

_HERE = pathlib.Path(__file__).parent
_ROOT = _HERE.parent.parent
_PROTOS = sorted((_ROOT / "protos" / "baton" / "v1").glob("*.proto"))


def ensure_stubs() -> None:
    """Generate the stubs if a checkout has not run `make protos` (e.g. a bare pytest run)."""
    missing = [p for p in _PROTOS if not (_HERE / f"{p.stem}_pb2.py").exists()
               or (_HERE / f"{p.stem}_pb2.py").stat().st_mtime < p.stat().st_mtime]
    if missing:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{_ROOT / 'protos'}",
                        f"--python_out={_ROOT}", f"--pyi_out={_ROOT}", f"--grpc_python_out={_ROOT}",
                        *map(str, _PROTOS)], check=True)


ensure_stubs()
