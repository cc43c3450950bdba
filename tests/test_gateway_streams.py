"""The gateway's handling of the router's streams, in process with fake calls: a call whose last
message arrived is left for the router to end before anything cancels it (the router counts a
request completed only when its call ends after the last message; cancelled if cancelled first)."""
from __future__ import annotations

import asyncio

import grpc

from baton.v1 import router_pb2
from router.http_gateway.choices import merge
from router.http_gateway.streaming import collect


class FakeCall:
    """A router call that has sent `messages` and ends `end_after_s` after its last one."""

    def __init__(self, messages, end_after_s: float, events: list[str]):
        self.messages, self.end_after_s, self.events = list(messages), end_after_s, events

    async def read(self):
        return self.messages.pop(0) if self.messages else grpc.aio.EOF

    async def code(self):
        await asyncio.sleep(self.end_after_s)
        self.events.append("ended")
        return grpc.StatusCode.OK

    def cancel(self) -> None:
        self.events.append("cancelled")


def _messages():
    last = router_pb2.GenerateResponse(text="b", token_ids=[2], finish_reason=router_pb2.FINISH_REASON_LENGTH)
    last.usage.completion_tokens = 2
    return router_pb2.GenerateResponse(text="a", token_ids=[1]), last


def test_a_streamed_answer_lets_each_router_call_end_before_the_response_cancels_it():
    events: list[str] = []

    async def serve():
        calls = [FakeCall(_messages()[1:], 0.05, events), FakeCall(_messages()[1:], 0.1, events)]
        streams = [(call, _messages()[0]) for call in calls]
        got = [msg.text async for _, msg in merge(streams)]
        for call in calls:   # what CancellingStream does once the response is sent
            call.cancel()
        return got

    assert sorted(asyncio.run(serve())) == ["a", "a", "b", "b"]
    assert events == ["ended", "ended", "cancelled", "cancelled"]


def test_a_whole_answer_waits_for_the_router_to_end_its_call():
    events: list[str] = []
    call = FakeCall(_messages()[1:], 0.05, events)
    choice = asyncio.run(collect(call, _messages()[0]))
    assert choice.text == "ab" and choice.ids == [1, 2] and events == ["ended"]
