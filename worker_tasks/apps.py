from django.apps import AppConfig


class WorkerTasksConfig(AppConfig):
    name = "worker_tasks"
    verbose_name = "Background jobs"
