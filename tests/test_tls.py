"""TLS on every link: router, prefill and decode serve TLS; every client verifies with the CA."""
import contextlib
import shutil
import subprocess

import grpc
import pytest

from deploy.launch import local_cluster, pools
from deploy.procs import wait_for
from router.client import RouterClient
from tiny_model import reference_greedy, save_tiny, tiny_llama

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


@contextlib.contextmanager
def tls_cluster(tmp_path, cert, key, worker_flags=()):
    """Router, prefill and decode over TLS with one self-signed certificate; yields them once a
    generation over TLS equals generate()."""
    model_dir = save_tiny(tmp_path / "model")
    tls = ["--tls-cert", cert, "--tls-key", key, "--tls-root-cert", cert]
    flags = ["--dtype", "float64", "--threads", "1", *tls, *worker_flags]
    with local_cluster(model_dir, pools(1, 1, flags=flags), router_args=tls) as c:
        with RouterClient(c.router.address, tls_root_cert=cert) as client:
            ids = wait_for(lambda: _try(client), 30, what="a generation over TLS")
            assert ids == reference_greedy(tiny_llama(), [4, 5, 6], 6, ignore_eos=True)
        yield {"router": c.router, "prefill": c.prefill[0], "decode": c.decode[0]}


def test_tls_everywhere(tmp_path):
    cert, key = _self_signed(tmp_path)
    with tls_cluster(tmp_path, cert, key) as c:
        with RouterClient(c["router"].address) as plaintext, pytest.raises(grpc.RpcError) as e:
            plaintext.stats(timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext side door


def test_mutual_tls_between_workers(tmp_path):
    """--tls-mutual: workers take calls only from peers whose certificate the CA signed."""
    from baton import grpc_util
    from baton.v1 import common_pb2, decode_pb2_grpc
    (tmp_path / "ca").mkdir()
    (tmp_path / "stranger").mkdir()
    cert, key = _self_signed(tmp_path / "ca")
    other_cert, other_key = _self_signed(tmp_path / "stranger")
    with tls_cluster(tmp_path, cert, key, ["--tls-mutual"]) as c:  # the router and prefill present their cert
        decode = c["decode"].address
        member = grpc_util.make_channel(decode, tls_root_cert=cert, tls_client_cert=cert, tls_client_key=key)
        assert decode_pb2_grpc.DecodeStub(member).Stats(common_pb2.WorkerStatsRequest(), timeout=5).running == 0
        member.close()
        for who in ({}, {"tls_client_cert": other_cert, "tls_client_key": other_key}):  # no cert; a cert the CA never signed
            channel = grpc_util.make_channel(decode, tls_root_cert=cert, **who)
            with pytest.raises(grpc.RpcError) as e:
                decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.WorkerStatsRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, who
            channel.close()


def _try(client):
    try:
        return client.complete([4, 5, 6], max_new_tokens=6, ignore_eos=True, timeout=10)[1]
    except grpc.RpcError:
        return None
