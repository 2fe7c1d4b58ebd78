"""The PostgreSQL broker's statements over its two tables (see ``models.py``).

- ``myapp_postgres_state``: one row (id 1), the newest position handed out;
  its row lock, held until COMMIT, orders publishers.
- ``myapp_postgres_event``: the history; ``data`` is bytea (UTF-8 bytes).

Parameters are always bound (``%(name)s``); no SQL is built from text.
"""

__all__ = ["NEXT_POSITION", "LAST_POSITION", "FIND_KEY", "INSERT", "HISTORY", "FETCH"]

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
