"""The router, its client and the HTTP gateway run without torch: only workers load a model."""
import subprocess
import sys


def test_router_gateway_and_client_import_without_torch():
    code = ("import sys, router.main, router.server, router.client, router.http_gateway; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"torch was imported: {out.stdout[:200]}"
