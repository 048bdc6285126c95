"""The public API from Python grpcio, a client written from the .proto alone (issue 12).

Run: `cargo build -p sluice-agent && python3 -m pytest -q tests/foreign` (`make foreign`).
"""

import queue as stdqueue

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def declare(pb, channel, name, **spec):
    admin = pb.s.AdminStub(channel)
    return admin.DeclareQueue(
        pb.m.DeclareQueueRequest(queue=pb.m.QueueSpec(name=name, **spec)), timeout=10
    )


def test_published_messages_are_consumed_and_acked(pb, channel):
    declare(pb, channel, "orders", partitions=2)
    publisher = pb.s.PublisherStub(channel)
    answer = publisher.Publish(
        pb.m.PublishRequest(
            queue="orders",
            messages=[pb.m.Message(payload=f"m-{i}".encode()) for i in range(10)],
        ),
        timeout=10,
    )
    assert all(c.code == 0 for c in answer.confirms)

    requests = stdqueue.Queue()
    requests.put(
        pb.m.ConsumeRequest(subscribe=pb.m.Subscribe(queue="orders", prefetch=100))
    )
    call = pb.s.ConsumerStub(channel).Consume(iter(requests.get, None), timeout=30)
    assert ("sluice-subscribed", "1") in call.initial_metadata()
    seen = set()
    for response in call:
        if response.HasField("delivery"):
            seen.add(response.delivery.message.payload.decode())
            requests.put(
                pb.m.ConsumeRequest(
                    sequence=len(seen),
                    settle=pb.m.Settle(
                        action=pb.m.SETTLE_ACTION_ACK, tags=[response.delivery.tag]
                    ),
                )
            )
        elif response.HasField("settled"):
            assert not response.settled.failures
            if response.settled.sequence == 10:
                break
    requests.put(None)
    assert seen == {f"m-{i}" for i in range(10)}
    stats = pb.s.AdminStub(channel).GetQueueStats(
        pb.m.GetQueueStatsRequest(name="orders"), timeout=10
    )
    assert (stats.total.ready, stats.total.in_flight) == (0, 0)


@pytest.mark.parametrize("name", ["", "Bad Name"])
def test_malformed_queue_names_are_invalid_arguments_naming_the_field(pb, channel, name):
    calls = {
        "queue": lambda: pb.s.PublisherStub(channel).Publish(
            pb.m.PublishRequest(queue=name, messages=[pb.m.Message(payload=b"x")]),
            timeout=10,
        ),
        "name": lambda: pb.s.AdminStub(channel).GetQueueStats(
            pb.m.GetQueueStatsRequest(name=name), timeout=10
        ),
    }
    for field, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_reflection_v1alpha_describes_the_services(pb, channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"sluice.v1.Publisher", "sluice.v1.Consumer", "sluice.v1.Admin"} <= services


def test_one_message_per_frame_is_answered_frame_by_frame(pb, channel):
    """grpcio sends each stream message in a DATA frame of its own."""
    declare(pb, channel, "tiny")
    frames = 5_000

    def requests():
        for sequence in range(frames):
            yield pb.m.PublishStreamRequest(
                sequence=sequence, queue="tiny", messages=[pb.m.Message(payload=b"x")]
            )

    answered = 0
    for response in pb.s.PublisherStub(channel).PublishStream(requests(), timeout=120):
        assert response.sequence == answered
        assert [c.code for c in response.confirms] == [0]
        answered += 1
    assert answered == frames
