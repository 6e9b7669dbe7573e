"""Routes of the v1 API."""

from django.urls import path

from notifications.api import dead_letters, inbox, suppressions, topics, views, webhooks

urlpatterns = [
    path("notifications", views.NotificationCreateView.as_view(), name="notification-create"),
    path("notifications/bulk", views.NotificationBulkView.as_view(), name="notification-bulk"),
    path(
        "notifications/cancel",
        views.NotificationCancelByKeyView.as_view(),
        name="notification-cancel-by-key",
    ),
    path(
        "notifications/<str:notification_id>/cancel",
        views.NotificationCancelView.as_view(),
        name="notification-cancel",
    ),
    path(
        "notifications/<str:notification_id>",
        views.NotificationDetailView.as_view(),
        name="notification-detail",
    ),
    path("recipients/<str:rid>", views.RecipientView.as_view(), name="recipient"),
    path(
        "recipients/<str:rid>/preferences",
        views.PreferencesView.as_view(),
        name="recipient-preferences",
    ),
    path("recipients/<str:rid>/devices", views.DevicesView.as_view(), name="recipient-devices"),
    path("recipients/<str:rid>/token", inbox.RecipientTokenView.as_view(), name="recipient-token"),
    path("inbox", inbox.InboxListView.as_view(), name="inbox"),
    path("inbox/unread-count", inbox.InboxUnreadCountView.as_view(), name="inbox-unread-count"),
    path("inbox/read-all", inbox.InboxReadAllView.as_view(), name="inbox-read-all"),
    path("inbox/preferences", inbox.InboxPreferencesView.as_view(), name="inbox-preferences"),
    path("inbox/<str:notification_id>/read", inbox.InboxReadView.as_view(), name="inbox-read"),
    path(
        "inbox/<str:notification_id>/archive",
        inbox.InboxArchiveView.as_view(),
        name="inbox-archive",
    ),
    path("templates", views.TemplateListView.as_view(), name="template-list"),
    path("templates/<slug:key>", views.TemplateDetailView.as_view(), name="template-detail"),
    path("topics/<str:key>", topics.TopicView.as_view(), name="topic"),
    path(
        "topics/<str:key>/subscribers",
        topics.TopicSubscribersView.as_view(),
        name="topic-subscribers",
    ),
    path("sandbox/messages", views.SandboxMessagesView.as_view(), name="sandbox-messages"),
    path("webhooks", webhooks.WebhookListView.as_view(), name="webhooks"),
    path("webhooks/<int:webhook_id>", webhooks.WebhookDetailView.as_view(), name="webhook"),
    path(
        "webhooks/<int:webhook_id>/rotate-secret",
        webhooks.WebhookRotateView.as_view(),
        name="webhook-rotate-secret",
    ),
    path(
        "webhooks/<int:webhook_id>/replay",
        webhooks.WebhookReplayView.as_view(),
        name="webhook-replay",
    ),
    path("suppressions", suppressions.SuppressionListView.as_view(), name="suppressions"),
    path(
        "suppressions/<int:suppression_id>",
        suppressions.SuppressionDetailView.as_view(),
        name="suppression",
    ),
    path("dead-letters", dead_letters.DeadLetterListView.as_view(), name="dead-letters"),
    path(
        "dead-letters/replay",
        dead_letters.DeadLetterBulkReplayView.as_view(),
        name="dead-letters-replay",
    ),
    path(
        "dead-letters/counts",
        dead_letters.DeadLetterCountsView.as_view(),
        name="dead-letters-counts",
    ),
    path(
        "dead-letters/<int:dead_letter_id>/replay",
        dead_letters.DeadLetterReplayView.as_view(),
        name="dead-letter-replay",
    ),
    path(
        "dead-letters/<int:dead_letter_id>/discard",
        dead_letters.DeadLetterDiscardView.as_view(),
        name="dead-letter-discard",
    ),
]
