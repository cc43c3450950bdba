"""Every error class maps to a real gRPC status code, named after it (baton/errors.py)."""
import grpc

from baton import errors


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
