"""Django app config for the workers (tasks, sandbox outbox)."""

from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Delivery"
