"""Django app config for notifications."""

from django.apps import AppConfig
from django.core import checks

from notifications.checks import TAG, public_base_url_is_https


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        checks.register(public_base_url_is_https, TAG)
