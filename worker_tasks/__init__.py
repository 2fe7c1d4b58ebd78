"""Background jobs of the demo, run by ``manage.py db_worker`` (django-tasks-db).

Jobs depend on the publishing API only (``myapp.publish``): they tell users
about their progress with ``send_event``.
"""
