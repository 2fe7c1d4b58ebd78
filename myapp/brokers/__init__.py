"""Broker backends and the process's broker, chosen by ``MYAPP_BROKER``.

``MYAPP_BROKER = {"BACKEND": "<dotted path>", "OPTIONS": {...}}`` follows
Django's convention (as ``STORAGES`` and ``TASKS``). Shipped backends:

- ``myapp.brokers.redis.RedisBroker`` (default): Redis or Valkey pub/sub;
- ``myapp.brokers.redis_cluster.RedisClusterBroker``: Redis Cluster, sharded pub/sub;
- ``myapp.brokers.postgres.PostgresBroker``: PostgreSQL LISTEN/NOTIFY;
- ``myapp.brokers.memory.MemoryBroker``: one process only (tests, runserver).
"""

from django.utils.module_loading import import_string

from myapp.exceptions import BrokerConfigurationError
from myapp.registry import ProcessLocal

from .base import Broker, Listener

__all__ = ["get_broker", "load_broker", "reset"]


def _missing(cls):
    """The abstract methods ``cls`` leaves unimplemented, sorted (list of str)."""
    return sorted(getattr(cls, "__abstractmethods__", ()))


def load_broker(config):
    """Build a broker from a ``MYAPP_BROKER``-shaped dict and return it.

    Raise BrokerConfigurationError (an ImproperlyConfigured) naming the fix
    when BACKEND cannot be imported or is not a Broker, or OPTIONS are wrong.
    Does no I/O.
    """
    if not isinstance(config, dict) or "BACKEND" not in config:
        raise BrokerConfigurationError(
            'MYAPP_BROKER must be a dict like {"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {...}}'
        )
    unknown = set(config) - {"BACKEND", "OPTIONS"}
    if unknown:
        raise BrokerConfigurationError(
            f"MYAPP_BROKER has unknown keys {sorted(unknown)}; only BACKEND and OPTIONS are read"
        )
    path = config["BACKEND"]
    try:
        backend = import_string(path)
    except ImportError as error:
        raise BrokerConfigurationError(
            f"MYAPP_BROKER BACKEND {path!r} cannot be imported ({error}); use one of "
            "'myapp.brokers.redis.RedisBroker', 'myapp.brokers.redis_cluster.RedisClusterBroker', "
            "'myapp.brokers.postgres.PostgresBroker', "
            "'myapp.brokers.memory.MemoryBroker' or your own Broker subclass"
        ) from None
    if not (isinstance(backend, type) and issubclass(backend, Broker)):
        raise BrokerConfigurationError(f"MYAPP_BROKER BACKEND {path!r} is not a subclass of myapp.brokers.base.Broker")
    listener = backend.listener_class
    if not (isinstance(listener, type) and issubclass(listener, Listener)):
        raise BrokerConfigurationError(
            f"MYAPP_BROKER BACKEND {path!r} has no listener_class (a subclass of myapp.brokers.base.Listener)"
        )
    for cls in (backend, listener):
        if missing := _missing(cls):
            raise BrokerConfigurationError(
                f"MYAPP_BROKER BACKEND {path!r}: {cls.__name__} does not implement {', '.join(missing)}"
            )
    options = config.get("OPTIONS") or {}
    if not isinstance(options, dict):
        raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS must be a dict, got {type(options).__name__}")
    try:
        return backend(**options)
    except TypeError as error:
        raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS do not fit {backend.__name__}: {error}") from None


def _build():
    from myapp.conf import setting

    return load_broker(setting("MYAPP_BROKER"))


_broker = ProcessLocal(_build, discard=lambda broker: broker.close())


def get_broker():
    """Return this process's broker, built from settings on first use (and again in a forked child)."""
    return _broker.get()


def reset():
    """Close and forget the process's broker (used when settings change)."""
    _broker.reset()
