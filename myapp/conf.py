"""The service's settings, each with its default and unit.

Read them with ``setting(name)``; every name starts with ``MYAPP_``.
docs/settings.md documents the same list for users.
"""

from django.conf import settings

__all__ = ["DEFAULTS", "setting", "heartbeat_seconds"]

DEFAULTS = {
    # Which broker backend carries events between processes, Django-style.
    "MYAPP_BROKER": {"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {}},
    # Seconds between heartbeat comments on every stream (also the hub's
    # marker interval). Polyfills give up after 45 s of silence.
    "MYAPP_HEARTBEAT_SECONDS": 15.0,
    # Milliseconds the browser waits before reconnecting (the SSE retry
    # field); each stream sends a value jittered between 1x and 2x.
    "MYAPP_RETRY_MILLISECONDS": 2000,
    # Events a stream may have queued before it is closed as too slow (the
    # browser then resumes from history).
    "MYAPP_STREAM_QUEUE_SIZE": 1000,
    # Seconds a new stream waits for the broker to confirm its subscription.
    "MYAPP_SUBSCRIBE_TIMEOUT_SECONDS": 5.0,
    # Seconds after which a stream ends so the browser reconnects and is
    # authorized again (bounds how long a revoked user keeps listening);
    # None for no limit.
    "MYAPP_STREAM_LIFETIME_SECONDS": 3600.0,
    # Whether the hub writes events straight to idle streams' sockets (one
    # non-blocking send each, no greenlet wake-up; see myapp/sink.py). Turn it
    # off behind gunicorn's uwsgi protocol or a WSGI middleware that rewrites
    # response bodies.
    "MYAPP_DIRECT_WRITES": True,
    # Seconds a write to a client may block before the connection is dropped.
    "MYAPP_SEND_TIMEOUT_SECONDS": 30.0,
    # Channels one stream may carry.
    "MYAPP_MAX_CHANNELS_PER_STREAM": 10,
    # Streams one logged-in user may hold on every worker and host together
    # (other hubs' counts come from the broker, myapp.presence); None for no
    # limit. Counted by user: streams opened with a subscription token and no
    # session are never counted, so a public board's shared token serves any
    # number of viewers.
    "MYAPP_MAX_STREAMS_PER_USER": 10,
    # Streams one worker process may hold (then 503 + Retry-After, so a load
    # balancer or the browser's retry finds another worker); None for no limit
    # but the file descriptors. Adopted streams (myapp.adoption) do not count
    # toward gunicorn's worker_connections.
    "MYAPP_MAX_STREAMS_PER_WORKER": None,
    # Characters in a channel name.
    "MYAPP_MAX_CHANNEL_LENGTH": 128,
    # Characters in an event type.
    "MYAPP_MAX_EVENT_TYPE_LENGTH": 64,
    # Characters in a publisher-chosen event id.
    "MYAPP_MAX_ID_LENGTH": 128,
    # UTF-8 bytes of one event's data (after JSON encoding).
    "MYAPP_MAX_EVENT_BYTES": 262144,
    # Dotted path of a callable(request, channel) -> bool | myapp.auth.GONE
    # that admits group channels; None denies every channel but the user's own.
    "MYAPP_CHANNEL_AUTHORIZER": None,
    # Seconds a signed subscription token stays valid by default.
    "MYAPP_TOKEN_MAX_AGE_SECONDS": 3600,
    # Bearer tokens accepted by the publish API (list of str); empty disables it.
    "MYAPP_PUBLISH_TOKENS": [],
    # Bytes of a publish API request body.
    "MYAPP_PUBLISH_MAX_BODY_BYTES": 65536,
    # Origins (scheme://host[:port]) allowed to open streams with credentials.
    "MYAPP_CORS_ALLOWED_ORIGINS": [],
    # Seconds a client is told to wait (Retry-After) on 503 and 429.
    "MYAPP_RETRY_AFTER_SECONDS": 5,
    # Channels whose presence is tracked (who is connected, across workers and
    # hosts: myapp.presence.presence), as fnmatch patterns, e.g. ["room:*"].
    "MYAPP_PRESENCE_CHANNELS": [],
    # Publish presence.join / presence.leave events on those channels.
    "MYAPP_PRESENCE_EVENTS": False,
    # Bearer token (str) a Prometheus scraper sends to GET /metrics
    # ("Authorization: Bearer <token>"); None turns metrics off (/metrics
    # answers 404 and nothing imports prometheus-client).
    "MYAPP_METRICS_TOKEN": None,
    # Events one publish API batch (POST /api/events/batch/) may carry.
    "MYAPP_PUBLISH_MAX_BATCH_EVENTS": 100,
    # Whether send_event writes to the outbox (the app myapp.outbox) unless
    # called with durable=False: the event is then committed with the caller's
    # transaction and a relay publishes it, surviving broker outages.
    "MYAPP_DURABLE_PUBLISH": False,
    # Seconds between two looks at the outbox where the database cannot
    # signal a new row (SQLite), and the standby relays' interval for trying
    # to become the active one (PostgreSQL, where NOTIFY wakes the active one).
    "MYAPP_OUTBOX_POLL_SECONDS": 0.5,
    # Database aliases whose outbox the relays empty; a durable send_event
    # may only write to one of them (its ``using``).
    "MYAPP_OUTBOX_DATABASES": ["default"],
    # Whether each gunicorn worker runs a relay next to its hub (one of them
    # is active per database); False leaves it to manage.py push_relay.
    "MYAPP_OUTBOX_RELAY_IN_WORKERS": True,
}


def setting(name):
    """Return the value of setting ``name`` (a key of DEFAULTS)."""
    return getattr(settings, name, DEFAULTS[name])


def heartbeat_seconds():
    """Return MYAPP_HEARTBEAT_SECONDS as a float (seconds)."""
    return float(setting("MYAPP_HEARTBEAT_SECONDS"))
