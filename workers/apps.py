"""Django app config for the workers (tasks, sandbox outbox)."""

from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Delivery"

    def ready(self) -> None:
        # Accepting (notifications, a layer below) hands due in-app deliveries to this
        # process's pusher through core.outbox.
        from core import outbox
        from workers.web_push import web_push_soon

        outbox.web_pusher_register(web_push_soon)
