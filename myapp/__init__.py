"""Live push for Django: Server-Sent Events from plain views under gunicorn's gevent workers.

Install: docs/install.md. Publish with ``myapp.publish.send_event``.
"""

__version__ = "0.1.0"
