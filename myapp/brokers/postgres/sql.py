"""The PostgreSQL broker's statements over its tables (see ``models.py``).

- ``myapp_postgres_state``: one row (id 1), the newest position handed out;
  its row lock, held until COMMIT, orders publishers.
- ``myapp_postgres_event``: the history; ``data`` is bytea (UTF-8 bytes).
- ``myapp_postgres_presence`` and ``myapp_postgres_hub``: presence entries
  per hub, and until when each hub counts as alive.

Parameters are always bound (``%(name)s``); no SQL is built from text.
"""

__all__ = [
    "NEXT_POSITION",
    "LAST_POSITION",
    "FIND_KEY",
    "INSERT",
    "HISTORY",
    "FETCH",
    "PRESENCE_SET",
    "PRESENCE_DELETE",
    "PRESENCE_ALIVE",
    "PRESENCE_READ",
    "PRESENCE_FORGET",
]

#: The next position (``ms << seq_bits | seq``, see myapp.ids), from the
#: server's clock and never below the last one + 1.
NEXT_POSITION = (
    "INSERT INTO myapp_postgres_state AS s (id, pos) "
    "VALUES (1, (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) << %(seq_bits)s) "
    "ON CONFLICT (id) DO UPDATE SET pos = GREATEST(s.pos + 1, EXCLUDED.pos) "
    "RETURNING pos"
)
LAST_POSITION = "SELECT pos FROM myapp_postgres_state WHERE id = 1"
FIND_KEY = "SELECT pos FROM myapp_postgres_event WHERE channel = %(channel)s AND key = %(key)s AND pos > %(cutoff)s"
#: Store the event, trim the channel to ``keep`` + 1 rows and the table to
#: ``cutoff``, and NOTIFY, in one statement.
INSERT = """
WITH prev AS (
    SELECT coalesce(max(pos), 0) AS pos FROM myapp_postgres_event WHERE channel = %(channel)s
), inserted AS (
    INSERT INTO myapp_postgres_event (channel, pos, prev, event_type, data, key)
    SELECT %(channel)s, %(pos)s, prev.pos, %(event_type)s, %(data)s, %(key)s FROM prev
), trimmed AS (
    DELETE FROM myapp_postgres_event WHERE channel = %(channel)s AND pos <= (
        SELECT pos FROM myapp_postgres_event WHERE channel = %(channel)s ORDER BY pos DESC OFFSET %(keep)s LIMIT 1
    )
), expired AS (
    DELETE FROM myapp_postgres_event WHERE pos < %(cutoff)s
)
SELECT pg_notify(%(pg_channel)s, %(payload)s)
"""
HISTORY = (
    "SELECT channel, pos, prev, event_type, data FROM myapp_postgres_event "
    "WHERE channel = ANY(%(channels)s) AND pos > %(after)s ORDER BY pos"
)
FETCH = "SELECT data FROM myapp_postgres_event WHERE channel = %s AND pos = %s"

#: Presence (myapp.presence): one hub's entry, its removal, its liveness, and
#: the sum over the hubs still alive (the server's clock decides).
PRESENCE_SET = (
    "INSERT INTO myapp_postgres_presence (key, hub, member, count) VALUES (%(key)s, %(hub)s, %(member)s, %(count)s) "
    "ON CONFLICT (key, hub, member) DO UPDATE SET count = EXCLUDED.count"
)
PRESENCE_DELETE = "DELETE FROM myapp_postgres_presence WHERE key = %(key)s AND hub = %(hub)s AND member = %(member)s"
PRESENCE_ALIVE = (
    "INSERT INTO myapp_postgres_hub (hub, expires) "
    "VALUES (%(hub)s, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + %(ttl_ms)s) "
    "ON CONFLICT (hub) DO UPDATE SET expires = EXCLUDED.expires"
)
PRESENCE_READ = """
SELECT p.member, sum(p.count) FROM myapp_postgres_presence p JOIN myapp_postgres_hub h ON h.hub = p.hub
WHERE p.key = %(key)s AND p.hub <> %(exclude)s AND h.expires > (extract(epoch FROM clock_timestamp()) * 1000)::bigint
GROUP BY p.member HAVING sum(p.count) > 0
"""
#: Entries and liveness rows of hubs dead for longer than ``grace_ms``.
PRESENCE_FORGET = """
WITH dead AS (
    DELETE FROM myapp_postgres_hub
    WHERE expires < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - %(grace_ms)s RETURNING hub
)
DELETE FROM myapp_postgres_presence WHERE hub IN (SELECT hub FROM dead)
"""
