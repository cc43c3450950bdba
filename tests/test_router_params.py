"""The router passes every sampling field of GenerateRequest to the workers (none dropped) and
refuses an out-of-range one with INVALID_ARGUMENT naming it, before any worker is involved."""
from __future__ import annotations

import grpc
import pytest

from loopback import loopback_cluster
from router.client import RouterClient
from test_http_input import router  # noqa: F401 - the fixture: an in-process router, no workers
from tiny_model import save_tiny


@pytest.mark.parametrize("fields, needle", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=11.0), "repetition_penalty must be in (0, 10]"),
    (dict(min_tokens=9, max_new_tokens=4), "min_tokens must be in [0, max_new_tokens=4]"),
    (dict(logit_bias={5: 101.0}), "logit_bias values must be in [-100, 100]"),
    (dict(logprobs=21), "logprobs must be in [0, 20]"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
])
def test_out_of_range_sampling_field_is_invalid_argument_naming_it(router, fields, needle):  # noqa: F811
    with RouterClient(router) as client, pytest.raises(grpc.RpcError) as e:
        client.complete([1, 2, 3], timeout=10, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()


def test_sampling_fields_reach_the_worker_and_the_router_checks_the_workers_context(tmp_path):
    """A +100 logit_bias forces its token; logprobs come back per token. The worker's K/V budget
    (2 rows x 97 columns of the tiny model) caps a request at 81 tokens: the router says so in its
    status and refuses a longer one itself, naming that context."""
    with loopback_cluster(save_tiny(tmp_path / "model"), colocated=1,
                          worker_args=["--max-batch", "2", "--kv-cache-memory", "198656"]) as c, \
            RouterClient(c["router"].address) as client:
        assert client.status().max_model_len == 81
        with pytest.raises(grpc.RpcError) as e:
            client.complete([1, 2, 3] * 30, max_new_tokens=2, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context of 81 tokens" in e.value.details()
        _, ids, _ = client.complete([1, 2, 3], max_new_tokens=5, logit_bias={7: 100.0}, timeout=60)
        assert ids == [7] * 5
        responses = list(client.generate([1, 2, 3], max_new_tokens=3, logprobs=2, timeout=60))
        logprobs = [lp for r in responses for lp in r.logprobs]
        assert len(logprobs) == 3 and all(len(lp.top) == 2 for lp in logprobs), logprobs
        with pytest.raises(grpc.RpcError) as e:   # the worker checks token ids against the vocabulary
            client.complete([1, 2, 3], max_new_tokens=3, logit_bias={300: 1.0}, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in e.value.details()


def test_baton_generate_min_p_flag_is_a_request_field():
    from deploy.cli import _sampling_fields, build_parser
    args = build_parser().parse_args(["generate", "hi", "--min-p", "0.25", "--temperature", "1"])
    assert _sampling_fields(args)["min_p"] == 0.25
    assert _sampling_fields(build_parser().parse_args(["generate", "hi"]))["min_p"] == 0.0
