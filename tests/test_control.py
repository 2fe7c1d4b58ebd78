"""Control messages (myapp.control): end a user's streams on every hub at once."""

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from myapp import control
from myapp.exceptions import InvalidEvent
from myapp.stream import open_stream
from tests.conftest import wait_until
from tests.sse_client import SSEParser


@pytest.fixture
def hubs(memory_broker, hub_factory):
    """Two hubs (two workers) on the process's memory broker."""
    return hub_factory(memory_broker), hub_factory(memory_broker)


def read_all(stream):
    """Every frame of a stream until it ends; return the parsed messages and the parser."""
    parser = SSEParser()
    messages = []
    for frame in stream:
        messages.extend(parser.feed(frame))
    return messages, parser


def test_disconnect_ends_every_stream_of_the_user_on_every_hub(hubs):
    """disconnect(user) ends the user's streams on both hubs with stream.end (reconnect false); others go on."""
    first, second = hubs
    mine = [open_stream(first, ("room:a",), owner=7), open_stream(second, ("room:b", "user:7"), owner=7)]
    other = first.subscribe(["room:a"], owner=8)
    control.disconnect(7)
    for stream in mine:
        messages, parser = read_all(stream)
        end = messages[-1]
        assert (end.type, json.loads(end.data)) == ("stream.end", {"reason": "disconnect", "reconnect": False})
        assert parser.retry is not None
    assert other.closed is None
    wait_until(lambda: first.stats()["streams"] == 1 and second.stats()["streams"] == 0, what="the streams to go")


def test_unsubscribe_ends_only_the_streams_carrying_the_channel(hubs):
    """unsubscribe(user, channel) ends that user's streams on the channel; they are told to reconnect."""
    first, second = hubs
    on_channel = open_stream(second, ("room:x", "room:y"), owner="7")
    elsewhere = first.subscribe(["room:y"], owner=7)
    control.unsubscribe(7, "room:x")
    messages, _ = read_all(on_channel)
    assert json.loads(messages[-1].data) == {"reason": "unsubscribe", "reconnect": True}
    assert elsewhere.closed is None


def test_control_messages_published_while_a_hub_was_away_still_apply(hub_factory):
    """A hub that reconnects replays the control channel's history like any channel's."""
    from myapp.brokers.base import CONTROL_CHANNEL
    from tests.test_hub import SpyBroker

    spy = SpyBroker()
    hub = hub_factory(spy, reconnect_delay=(0.05, 0.2))
    sub = hub.subscribe(["room:a"], owner=3)
    spy.refuse.set()
    spy.listeners[-1].cut()
    wait_until(lambda: not hub.connected, what="the hub to notice")
    spy.publish(CONTROL_CHANNEL, "control", json.dumps({"action": "disconnect", "owner": "3"}))
    spy.refuse.clear()
    wait_until(lambda: sub.closed == "disconnect", what="the missed disconnect to apply")


def test_bad_input_is_refused(memory_broker):
    """A bad channel or an unsaved user raises; nothing is sent."""
    with pytest.raises(InvalidEvent):
        control.unsubscribe(1, "bad name")
    with pytest.raises(ValueError):
        control.disconnect(None)


def test_management_command(memory_broker, hub_factory):
    """manage.py push_control disconnect USER ends the user's streams."""
    hub = hub_factory(memory_broker)
    sub = hub.subscribe(["room:a"], owner=4)
    call_command("push_control", "disconnect", "4")
    wait_until(lambda: sub.closed == "disconnect", what="the stream to end")
    with pytest.raises(CommandError):
        call_command("push_control", "unsubscribe", "4", "bad name")
