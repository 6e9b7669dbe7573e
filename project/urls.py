"""URL wiring: the v1 API, schema and docs, health and metrics endpoints, the inbox page and
the admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from channels_app.views import inbox_page
from notifications import metrics_scrape
from notifications.api import docs, health, hooks
from notifications.api.unsubscribe import UnsubscribeView

urlpatterns = [
    path("api/v1/", include("notifications.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", docs.SwaggerView.as_view(), name="swagger-ui"),
    path("api/redoc/", docs.RedocView.as_view(), name="redoc"),
    path("hooks/sendgrid", hooks.SendGridHookView.as_view(), name="hooks-sendgrid"),
    path("hooks/twilio", hooks.TwilioHookView.as_view(), name="hooks-twilio"),
    path("unsubscribe/<str:token>", UnsubscribeView.as_view(), name="unsubscribe"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_scrape.metrics_view, name="metrics"),
    path("inbox/", inbox_page, name="inbox-page"),
    path("admin/", admin.site.urls),
]

handler400 = "notifications.api.errors.bad_request"
handler403 = "notifications.api.errors.forbidden"
handler404 = "notifications.api.errors.not_found"
handler500 = "notifications.api.errors.server_error"
