"""Routing: given a recipient, a template and a request, which deliveries exist, on which
channel, when, and why not. One Route per channel asked for (or, by default, per channel of
the template):

- who and where: the channel is in the template, the recipient's preferences allow its
  category there (critical overrides), the recipient has an address for it, and no
  suppression binds it (notifications.suppressions);
- when: at once, at `send_at`, after an escalation step's wait, at the end of a digest's
  window, or at the end of the recipient's quiet hours (notifications.schedules), whichever
  applies last;
- how often: a frequency cap (notifications.frequency_caps) may still skip a routed
  delivery; accepting takes every cap's place in one Redis round trip (caps_apply) and marks
  the deliveries over it with routes_capped.

Nothing here writes: accepting.notification_prepare routes, renders and builds the rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from notifications.frequency_caps import CapCheck
from notifications.models import CHANNEL_ORDER, Channel, DeliveryStatus, Priority, SkipReason
from notifications.schedules import EscalationStep, quiet_until
from notifications.selectors import RecipientContext, TemplateSnapshot, devices_active_get
from notifications.services import ValidationFailed
from notifications.suppressions import suppression_binds


@dataclass(frozen=True)
class Route:
    channel: str
    status: str
    reason: str = ""
    address: str = ""
    # When a scheduled delivery falls due: send_at, the end of quiet hours, or an
    # escalation's deadline.
    due_at: datetime | None = None
    # An escalation step: "read" or "delivered" (schedules.ESCALATION_CONDITIONS).
    escalate_unless: str = ""
    # A digest member, held until its window ends.
    digest: bool = False


def _address(channel: str, recipient: RecipientContext) -> str:
    if channel == Channel.EMAIL:
        return recipient.email
    if channel == Channel.SMS:
        return recipient.phone
    if channel == Channel.PUSH:
        return "devices" if devices_active_get(recipient_id=recipient.id) else ""
    return recipient.external_id


def channels_route(
    *,
    requested: list[str] | None,
    template: TemplateSnapshot,
    recipient: RecipientContext,
    priority: str,
    now: datetime,
    send_at: datetime | None = None,
    digest_wanted: bool = True,
    escalation: list[EscalationStep] | None = None,
) -> list[Route]:
    """requested ∩ template ∩ preferences ∩ addresses, each exclusion with its reason; then
    the time rules: a channel the template escalates to waits for its deadline, and a
    non-critical delivery due inside the recipient's quiet hours waits for their end."""
    template_channels = [c for c in CHANNEL_ORDER if c in template.content]
    wanted = requested if requested is not None else template_channels
    due = send_at if send_at is not None and send_at > now else now
    steps = template.escalation if escalation is None else escalation
    escalations = {step.channel: step for step in steps}
    critical = priority == Priority.CRITICAL
    digest = template.digest if not critical and digest_wanted else None
    routes = []
    for channel in wanted:
        if channel not in template.content:
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.NOT_IN_TEMPLATE))
            continue
        if not critical and not recipient.allows(channel=channel, category=template.category):
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.OPTED_OUT))
            continue
        address = _address(channel, recipient)
        if not address:
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.NO_ADDRESS))
            continue
        suppressed = recipient.suppressed.get(channel)
        if suppressed and suppression_binds(reason=suppressed, priority=priority):
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.SUPPRESSED))
            continue
        step = escalations.get(channel)
        digested = (
            digest is not None
            and step is None
            and not (channel == Channel.WEB and digest.web_at_once)
        )
        channel_due = due
        if step is not None:
            channel_due = due + step.after
        elif digested and digest is not None:
            channel_due = due + digest.window
        held = (
            None
            if critical
            else quiet_until(
                recipient.quiet_hours,
                timezone_name=recipient.timezone,
                channel=channel,
                at=channel_due,
            )
        )
        if held is not None:
            channel_due = held
        if channel_due > now:
            status = DeliveryStatus.SCHEDULED
            reason = SkipReason.QUIET_HOURS if held else SkipReason.DIGEST if digested else ""
        else:
            status, reason, channel_due = DeliveryStatus.QUEUED, "", None  # type: ignore[assignment]
        routes.append(
            Route(
                channel,
                status,
                reason,
                address if channel != Channel.PUSH else "",
                due_at=channel_due,
                escalate_unless=step.unless if step is not None else "",
                digest=digested,
            )
        )
    return routes


def route_answer(route: Route) -> dict[str, Any]:
    """A delivery as the 202 answers it: its status, why it was skipped or held, and when a
    scheduled one falls due."""
    answer: dict[str, Any] = {"channel": route.channel, "status": route.status}
    if route.reason:
        answer["reason"] = route.reason
    if route.status == DeliveryStatus.SCHEDULED and route.due_at is not None:
        answer["scheduled_for"] = route.due_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if route.escalate_unless:
        answer["unless"] = route.escalate_unless
    return answer


def escalation_check(template: TemplateSnapshot, steps: list[EscalationStep]) -> None:
    """A request's own escalation steps name channels its template has."""
    errors = {
        f"escalation.{index}.channel": [f"The template has no {step.channel} content."]
        for index, step in enumerate(steps)
        if step.channel not in template.content
    }
    if errors:
        raise ValidationFailed(errors)


def cap_checks(
    *,
    owner_id: int,
    template: TemplateSnapshot,
    recipient_id: int,
    priority: str,
    member: str,
    routes: list[Route],
) -> list[CapCheck]:
    """The frequency caps this notification's routed deliveries fall under."""
    if not template.frequency_caps:
        return []
    return [
        CapCheck(
            owner_id=owner_id,
            recipient_id=recipient_id,
            scope=template.cap_scope_key,
            channel=route.channel,
            limit=cap.limit,
            window=cap.window,
            member=f"{member}:{route.channel}",
            force=priority == Priority.CRITICAL,
        )
        for route in routes
        if route.status != DeliveryStatus.SKIPPED
        and not route.digest  # digest members are not capped
        and (cap := template.frequency_caps.get(route.channel)) is not None
    ]


def routes_capped(routes: list[Route], capped: set[str]) -> list[Route]:
    """The routes with those of the channels over their frequency cap skipped."""
    return [
        replace(r, status=DeliveryStatus.SKIPPED, reason=SkipReason.FREQUENCY_CAPPED, due_at=None)
        if r.channel in capped
        else r
        for r in routes
    ]
