"""Digests: members held until their window ends, then flushed by the relay into one
notification per group (recipient and digest key), rendered over every event of the group.
The status changes are the lifecycle's (workers/transitions.py); this module groups and
renders."""

from __future__ import annotations

from datetime import datetime

from notifications import templating, unsubscribe
from notifications.models import Delivery, DeliveryStatus, Template
from workers import transitions


def digests_flush(*, delivery_ids: list[int], now: datetime) -> dict[str, list[int]]:
    """Digest members whose window has ended (the relay holds their rows locked): each group
    (recipient and digest key: the template and the rendered key) becomes ONE notification
    with one queued delivery per channel, rendered over every member of the group that is
    still waiting, due or not (an event that came late in the window rides along); the
    members become `skipped` (`digested`), each with an event naming the digest
    (transitions.deliveries_digest); a group that cannot be rendered is cancelled. All in the
    relay's transaction: a crash before it commits leaves every member waiting, so an event
    is neither lost nor sent twice. Returns the new deliveries' ids by channel, for the relay
    to publish in the same round. Which windows have ended the relay judged on the database's
    clock; `now` only stamps updated_at."""
    if not delivery_ids:
        return {}
    groups = sorted(
        set(
            Delivery.objects.filter(pk__in=delivery_ids).values_list(
                "notification__recipient_id", "digest_key"
            )
        )
    )
    published: dict[str, list[int]] = {}
    for recipient_id, digest_key in groups:
        members = list(
            Delivery.objects.filter(
                notification__recipient_id=recipient_id,
                digest_key=digest_key,
                status=DeliveryStatus.SCHEDULED,
                lease_token__isnull=True,
            )
            .select_for_update(skip_locked=True, of=("self",))
            .select_related("notification__recipient")
            .order_by("notification__created_at", "pk")
        )
        if not members:
            continue
        newest = members[-1].notification
        template = (
            Template.objects.filter(pk=newest.template_id).first()
            if newest.template_id is not None
            else None
        )
        key = digest_key.partition(":")[2]
        by_channel: dict[str, list[Delivery]] = {}
        for member in members:
            by_channel.setdefault(member.channel, []).append(member)
        events_of = {m.notification_id: m.notification.data for m in members}
        rendered: dict[str, dict[str, str]] = {}
        problem = "" if template is not None else "the template was deleted"
        if template is not None:
            _, content = templating.pick_locale_content(
                default_locale=template.locale,
                content=template.content,
                translations=template.translations,
                wanted=newest.locale,
            )
            for channel, rows in by_channel.items():
                events = [r.notification.data for r in rows]
                try:
                    rendered[channel] = templating.render_channel(
                        channel,
                        content[channel],
                        unsubscribe.render_data(
                            channel=channel,
                            fields=content[channel],
                            data=templating.digest_data(events, key),
                            owner_id=newest.owner_id,
                            recipient_id=recipient_id,
                            category=newest.category,
                        ),
                    )
                except (templating.TemplateError, KeyError) as exc:
                    problem = f"the digest could not be rendered: {exc}"
                    break
        if problem:
            transitions.deliveries_cancel_locked(members, now, detail=problem)
            continue
        created = transitions.deliveries_digest(
            members=members,
            data=templating.digest_data(list(events_of.values()), key),
            rendered=rendered,
            now=now,
        )
        for delivery in created:
            published.setdefault(delivery.channel, []).append(delivery.pk)
    return published
