"""Publishing: ``send_event``, the name of a user's private channel, and ``CLOSE_EVENT``.

Everything a publisher (a view, a background job, a Celery task) needs comes
from this module; ``CLOSE_EVENT`` (``"stream.close"``) is re-exported from
``myapp.events`` so publishers import nothing else.
"""

import json

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction

from myapp import metrics, outbox
from myapp.brokers import get_broker
from myapp.conf import setting
from myapp.events import CLOSE_EVENT, validate_channel, validate_event_type, validate_key, validate_text
from myapp.exceptions import EventTooLarge, InvalidEvent
from myapp.ids import format_id

__all__ = ["send_event", "user_channel", "encode_data", "validate_event", "CLOSE_EVENT"]

USER_CHANNEL_PREFIX = "user:"


def user_channel(user):
    """Return the name of a user's private channel: ``"user:<pk>"``.

    user: a user instance, or its primary key. Only that user's session can
    read the channel (see ``myapp.auth``).

    Raise ValueError for an unsaved or anonymous user.
    """
    pk = getattr(user, "pk", user)
    if pk is None:
        raise ValueError("an unsaved or anonymous user has no channel")
    return f"{USER_CHANNEL_PREFIX}{pk}"


def encode_data(data, *, raw=False):
    """Return the event data as the str that goes on the wire.

    raw=False: ``data`` is JSON-encoded with Django's ``DjangoJSONEncoder``
        (dates, decimals, UUIDs, lazy strings), compact, non-ASCII kept as is;
        NaN and infinities are refused (JSON.parse cannot read them).
    raw=True: ``data`` must be a str and is sent as it is; each line (split
        on CRLF, CR or LF) becomes one ``data:`` line.

    Raise InvalidEvent if the data cannot be encoded.
    """
    if raw:
        validate_text("data", data)
        return data
    try:
        text = json.dumps(data, cls=DjangoJSONEncoder, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidEvent(f"data is not JSON-serializable: {error}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates in a string: JSON can still carry them as \\u escapes.
        text = json.dumps(data, cls=DjangoJSONEncoder, allow_nan=False, separators=(",", ":"))
    return text


def validate_event(channel, event_type, text, key=None):
    """Raise InvalidEvent (or EventTooLarge) unless the event may be published.

    text: the wire data (str) from ``encode_data``. Limits come from the
    MYAPP_MAX_* settings.
    """
    validate_channel(channel, max_length=setting("MYAPP_MAX_CHANNEL_LENGTH"))
    validate_event_type(event_type, max_length=setting("MYAPP_MAX_EVENT_TYPE_LENGTH"))
    if key is not None:
        validate_key(key, max_length=setting("MYAPP_MAX_ID_LENGTH"))
    limit = setting("MYAPP_MAX_EVENT_BYTES")
    if len(text) > limit // 4:  # a str of n characters is at most 4n UTF-8 bytes
        size = len(text.encode("utf-8"))
        if size > limit:
            raise EventTooLarge(f"data is {size} bytes; the limit (MYAPP_MAX_EVENT_BYTES) is {limit}")


def send_event(channel, event_type, data, *, id=None, raw=False, using=None, durable=None):
    """Publish an event to every stream subscribed to ``channel``.

    channel: the channel name (str): 1 to MYAPP_MAX_CHANNEL_LENGTH characters
        from ``A-Z a-z 0-9 _ . : @ = + -``. ``user_channel(user)`` names a
        user's private channel.
    event_type: the SSE event type (str): no CR, LF or NUL, at most
        MYAPP_MAX_EVENT_TYPE_LENGTH characters; types starting with
        ``stream.`` are reserved except ``stream.close``, which tells our page
        script to stop listening.
    data: any value ``DjangoJSONEncoder`` can encode (or a str with raw=True).
        At most MYAPP_MAX_EVENT_BYTES bytes once encoded.
    id: an optional publisher-chosen id (str, no CR, LF or NUL) that makes the
        publish idempotent: publishing again with the same id on the same
        channel within the history's time-to-live returns the first event's id
        and delivers nothing. The SSE ``id:`` field always carries the
        broker-assigned id (the resume cursor for Last-Event-ID).
    raw: send ``data`` (a str) as it is instead of JSON-encoding it.
    using: the database alias whose transaction the publish follows (default
        Django's default database); with durable publishing, the database
        whose outbox gets the event.
    durable: True writes the event to the outbox (the app ``myapp.outbox``)
        instead of publishing it: see below. None (the default) follows the
        MYAPP_DURABLE_PUBLISH setting; False always publishes directly.

    Directly: inside ``transaction.atomic()`` the event is published after
    COMMIT (with ``transaction.on_commit``) and never on rollback, with every
    backend; a publishing error then propagates out of the outermost atomic
    block, after the data was committed, and a process that dies between
    COMMIT and the callback loses the event. Outside a transaction it is
    published at once.

    Durably: the event is inserted into the outbox table of ``using``, inside
    the caller's transaction when there is one (committed before returning
    otherwise), and a relay publishes it to the broker, in order, once
    (docs/outbox.md). A broker outage or a crash after COMMIT delays it and
    never loses it; a rollback drops it with the caller's other writes.

    Return the event's id (``"<ms>-<seq>"``), or None when it waits for
    COMMIT or goes through the outbox.

    Raise InvalidEvent (a ValueError) or EventTooLarge for bad input, and
    ``myapp.exceptions.BrokerUnavailable`` when the broker cannot take the
    event within its timeouts; in both cases nothing was published. Durably,
    the broker is never called: a database that cannot take the row raises
    Django's DatabaseError (e.g. OperationalError), as the caller's own
    writes would, and ImproperlyConfigured says what to add when the app
    ``myapp.outbox`` is not installed or ``using`` is not in
    MYAPP_OUTBOX_DATABASES.
    """
    text = encode_data(data, raw=raw)
    validate_event(channel, event_type, text, id)
    if durable is None:
        durable = setting("MYAPP_DURABLE_PUBLISH")
    if durable:
        if not apps.is_installed(outbox.APP):
            raise ImproperlyConfigured(
                f"send_event(durable=True) writes to the outbox of the app {outbox.APP!r}, which is not in "
                f'INSTALLED_APPS: add "{outbox.APP}" and run manage.py migrate'
            )
        from myapp.outbox.store import enqueue

        enqueue(channel, event_type, text, key=id, using=using)
        return None
    broker = get_broker()

    def publish():
        with metrics.publishing():
            return broker.publish(channel, event_type, text, idempotency_key=id)

    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(publish, using=using)
        return None
    return format_id(publish())
