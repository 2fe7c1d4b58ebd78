"""Exceptions raised by the push service's public API."""

from django.core.exceptions import ImproperlyConfigured

__all__ = ["BrokerUnavailable", "InvalidEvent", "EventTooLarge", "BrokerConfigurationError"]


class BrokerUnavailable(Exception):
    """The broker cannot take or deliver events right now.

    Raised by ``send_event`` when the broker refuses the connection, times out
    (the backend's ``socket_timeout``/``connect_timeout`` OPTIONS, in seconds)
    or fails mid-command, and by the hub when a stream cannot be subscribed.
    The event was not published; retrying later is safe, and with a
    publisher-chosen ``id`` a retry can never deliver it twice.
    """


class InvalidEvent(ValueError):
    """An event's channel, event type, id or data breaks the documented limits.

    The message names the field and the rule it broke. Nothing was published.
    """


class EventTooLarge(InvalidEvent):
    """The event's data is larger than ``MYAPP_MAX_EVENT_BYTES`` (UTF-8 bytes)."""


class BrokerConfigurationError(ImproperlyConfigured):
    """``MYAPP_BROKER`` names a backend or options that cannot work; the message says the fix."""
