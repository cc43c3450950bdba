"""Every error class maps to a real gRPC status code, named after it (baton/errors.py), and the
request field an error is about travels with it to the HTTP API's `param`."""
from types import SimpleNamespace

import grpc
import pytest

from baton import errors
from baton.sampling import SamplingParams
from baton.wire import sampling_from_request
from router.http_gateway.errors import rpc_error


def _all(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all(sub)


def test_every_error_class_names_a_grpc_status_code():
    classes = list(_all(errors.BatonError))
    assert len(classes) >= 11
    for cls in classes:
        assert hasattr(grpc.StatusCode, cls.code_name), (cls, cls.code_name)


def test_status_codes_follow_the_class_names_and_subclasses_keep_their_parents():
    assert errors.InvalidArgument.code_name == "INVALID_ARGUMENT"
    assert errors.FailedPrecondition.code_name == "FAILED_PRECONDITION"
    assert errors.ResourceExhausted.code_name == "RESOURCE_EXHAUSTED"
    assert errors.KVCodecError.code_name == "INVALID_ARGUMENT"
    assert errors.DecodeUnreachable.code_name == "UNAVAILABLE"
    assert errors.DecodeUnreachable.failed_role == "decode"
    assert errors.BatonError.code_name == "INTERNAL"


class _FailedCall(grpc.RpcError):
    def __init__(self, details, metadata=()):
        self._details, self._md = details, metadata

    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._md


def test_the_http_api_names_the_field_the_error_carries_not_one_its_text_mentions():
    """The field travels as trailing metadata from the check that fails to the 400's `param`; the
    message's wording is for people (it may mention other fields)."""
    e = _FailedCall("max_new_tokens must be in [1, 4096] (temperature and top_p are fine)",
                    ((errors.FIELD_KEY, "max_new_tokens"),))
    err = rpc_error(e)
    assert (err.status, err.param) == (400, "max_tokens") and "max_tokens must be" in err.message
    assert rpc_error(_FailedCall("the regex cannot be used", ((errors.FIELD_KEY, "regex"),))).param == "guided_regex"
    assert rpc_error(_FailedCall("prompt must not be empty", ((errors.FIELD_KEY, "prompt"),)), chat=True).param == "messages"
    assert rpc_error(_FailedCall("K/V shape does not match")).param is None


def test_a_field_named_by_a_check_reaches_the_error():
    r = SimpleNamespace(logit_bias={}, min_tokens=5, repetition_penalty=1.0, frequency_penalty=0.0,
                        presence_penalty=0.0, json_schema="", regex="", grammar="", HasField=lambda f: False)
    with pytest.raises(errors.InvalidArgument) as e:
        sampling_from_request(r, SamplingParams(max_new_tokens=2))
    assert e.value.field == "min_tokens"


class _GoneCaller:
    """A unary handler's context whose caller cancelled: gRPC's abort raises, as it does."""

    def __init__(self):
        self.aborted = None

    def is_active(self):
        return False

    def abort(self, code, details):
        self.aborted = (code, details)
        raise Exception("aborted")


def test_a_handler_whose_caller_went_away_aborts_cancelled_instead_of_answering_none():
    """Answering None makes gRPC log 'Exception serializing message!' for every cancelled call."""
    from baton.errors import Unavailable
    from baton.grpc_util import rpc

    class Servicer:
        @rpc
        def Call(self, request, context):
            raise Unavailable("the K/V push stopped")

    context = _GoneCaller()
    with pytest.raises(Exception, match="aborted"):
        Servicer().Call(None, context)
    assert context.aborted == (grpc.StatusCode.CANCELLED, "the caller went away")
