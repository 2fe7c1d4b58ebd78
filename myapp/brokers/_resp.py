"""An incremental reader of the replies a subscribed Redis connection receives.

The hub's subscriber connection carries nothing but pub/sub replies, so it
reads them itself instead of through redis-py's per-message ``get_message``
(which costs a socket timeout change, a poll and several layers of calls per
message): one ``recv`` takes whatever arrived, and this parser splits it into
replies with a few ``bytes`` operations each.

Source: the Redis serialization protocol, RESP2 (redis.io/docs/latest/develop/
reference/protocol-spec/): arrays ``*<n>\\r\\n``, bulk strings ``$<len>\\r\\n<bytes>\\r\\n``,
integers ``:<n>\\r\\n``, simple strings ``+...\\r\\n`` and errors ``-...\\r\\n``.
In subscribed mode every reply is an array: ``[b"message", channel, data]``,
``[b"subscribe", channel, count]``, ``[b"unsubscribe", channel, count]``.
"""

__all__ = ["ReplyReader", "RedisReplyError"]


class RedisReplyError(ValueError):
    """The server answered with an error reply, or with bytes that are not RESP2."""


class ReplyReader:
    """Feed it the bytes read from the socket; ``replies()`` returns the complete replies so far.

    A reply is a list of bytes and ints (an array), or a single value. Bytes
    of an incomplete reply stay buffered for the next feed.
    """

    __slots__ = ("_buffer",)

    def __init__(self):
        self._buffer = b""

    def feed(self, data):
        """Append ``data`` (bytes) to what is buffered."""
        self._buffer = self._buffer + data if self._buffer else data

    def replies(self):
        """Return the list of complete replies in the buffer, in order.

        Raise RedisReplyError on an error reply or malformed bytes.
        """
        data = self._buffer
        size = len(data)
        pos = 0
        out = []
        while pos < size:
            reply, end = _value(data, pos, size)
            if end < 0:
                break
            out.append(reply)
            pos = end
        self._buffer = data[pos:]
        return out


def _value(data, pos, size):
    """Parse one value at ``pos``; return (value, end) or (None, -1) if incomplete."""
    eol = data.find(b"\r\n", pos)
    if eol < 0:
        if size - pos > 65536:
            raise RedisReplyError("a reply line longer than 64 KiB")
        return None, -1
    kind = data[pos]
    if kind == 36:  # "$" bulk string
        length = int(data[pos + 1 : eol])
        if length < 0:
            return None, eol + 2
        start = eol + 2
        end = start + length
        if end + 2 > size:
            return None, -1
        return data[start:end], end + 2
    if kind == 42:  # "*" array
        count = int(data[pos + 1 : eol])
        items = []
        end = eol + 2
        for _ in range(count):
            item, end = _value(data, end, size)
            if end < 0:
                return None, -1
            items.append(item)
        return items, end
    if kind == 58:  # ":" integer
        return int(data[pos + 1 : eol]), eol + 2
    if kind == 43:  # "+" simple string
        return data[pos + 1 : eol], eol + 2
    if kind == 45:  # "-" error
        raise RedisReplyError(data[pos + 1 : eol].decode("utf-8", "replace"))
    raise RedisReplyError(f"not a RESP2 reply: {data[pos : pos + 40]!r}")
