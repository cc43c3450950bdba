"""The router, its client and the HTTP gateway run without torch: only workers load a model."""
import ast
import pathlib
import subprocess
import sys


def test_router_gateway_and_client_import_without_torch():
    code = ("import sys, router.main, router.server, router.client, router.http_gateway; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"torch was imported: {out.stdout[:200]}"


# Each layer may import only the layers below it (docs/lifecycle.md's module map).
ROOT = pathlib.Path(__file__).resolve().parent.parent
ABOVE = {
    "baton": {"router", "prefill_service", "decode_service", "deploy"},
    "prefill_service": {"router", "decode_service", "deploy"},   # a worker reaches the router over gRPC only
    "decode_service": {"router", "deploy"},
    "router": {"prefill_service", "decode_service", "deploy"},
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {name.split(".")[0] for name in names}


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for layer, above in ABOVE.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith("baton/v1/"):
                continue
            wrong += [f"{rel} imports {m}" for m in sorted(_imports(path) & above)]
    assert not wrong, wrong
