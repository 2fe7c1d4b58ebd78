"""Checks for broker ``OPTIONS``: each raises BrokerConfigurationError naming the option and the fix."""

from myapp.exceptions import BrokerConfigurationError

__all__ = ["seconds", "positive_int", "text"]


def _refuse(name, expected, value):
    raise BrokerConfigurationError(f"MYAPP_BROKER OPTIONS {name} must be {expected}, got {value!r}")


def seconds(name, value, *, minimum=0.0):
    """Return ``value`` as float seconds; raise unless it is a number > ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        _refuse(name, f"a number of seconds > {minimum:g}", value)
    return float(value)


def positive_int(name, value, *, minimum=1, unit=""):
    """Return ``value``; raise unless it is an int >= ``minimum`` (bools refused)."""
    if type(value) is not int or value < minimum:
        _refuse(name, f"an int >= {minimum}{' (' + unit + ')' if unit else ''}", value)
    return value


def text(name, value, *, max_bytes=None):
    """Return ``value``; raise unless it is a str (of at most ``max_bytes`` UTF-8 bytes)."""
    if not isinstance(value, str) or (max_bytes is not None and len(value.encode("utf-8", "replace")) > max_bytes):
        _refuse(name, "a str" + (f" of at most {max_bytes} bytes" if max_bytes is not None else ""), value)
    return value
