"""The baseline: the classic design, one broker connection per stream (as the old django-sse did).

Each request opens its own redis-py ``PubSub`` on the process's default
connection pool (redis-py 8 caps it at 100 connections per process), waits for
the SUBSCRIBE confirmation, then relays every pub/sub message as one SSE
event, with a heartbeat comment after ``MYAPP_HEARTBEAT_SECONDS`` without
messages. No history, no ids, no shared subscription: Valkey itself fans each
event out to every stream's connection.

Wire format towards the load generator is the same as the service's
(``stream.open`` once subscribed, then the published events), so the
benchmark measures both with the same client. Publishing is a plain
``PUBLISH`` of ``"<event type>\\n<data>"`` (``publish`` / ``send_event``).
"""

import json

import redis
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from myapp import sse
from myapp.conf import heartbeat_seconds
from myapp.tokens import InvalidToken, verify_token

__all__ = ["events", "publish", "send_event", "PREFIX"]

#: Pub/sub channel prefix of the baseline (separate from the service's keys).
PREFIX = "baseline:"

# Module level, as a settings-built client usually is: one default pool per
# worker process, created lazily by redis-py on first use.
_client = None


def _redis():
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.BENCH_BASELINE_REDIS_URL)
    return _client


def events(request):
    """Stream one channel (``?token=...&channel=...``) as SSE over a PubSub of its own."""
    try:
        granted = verify_token(request.GET.get("token"))
    except InvalidToken:
        return HttpResponse("invalid token\n", status=401, content_type="text/plain")
    channel = request.GET.get("channel", "")
    if channel not in granted:
        return HttpResponse("channel not granted\n", status=403, content_type="text/plain")
    pubsub = _redis().pubsub()
    try:
        # Takes a connection from the pool: MaxConnectionsError (a 500) once
        # 100 streams of this process hold one each.
        pubsub.subscribe(PREFIX + channel)
    except BaseException:
        pubsub.close()
        raise
    response = StreamingHttpResponse(_frames(pubsub, channel), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


def _frames(pubsub, channel):
    heartbeat = heartbeat_seconds()
    try:
        yield sse.encode(comment="stream open", retry=2000)
        while True:
            message = pubsub.get_message(timeout=heartbeat)
            if message is None:
                yield sse.comment()
            elif message["type"] == "message":
                event_type, data = message["data"].decode().split("\n", 1)
                yield sse.encode(data, event=event_type)
            elif message["type"] == "subscribe":
                yield sse.encode(json.dumps({"channels": [channel]}), event="stream.open")
    finally:
        pubsub.close()


def publish(client, channel, event_type, data):
    """Publish like the classic design: one PUBLISH, no history, no id. Return the receivers (int)."""
    return client.publish(PREFIX + channel, event_type + "\n" + data)


def send_event(client, channel, event_type, data):
    """The classic ``send_event``: JSON-encode ``data`` and PUBLISH it."""
    return publish(client, channel, event_type, json.dumps(data))
