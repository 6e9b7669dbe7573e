"""Admin views beyond ModelAdmin's own: the template live preview (a JSON endpoint), "send a
test", the API key shown once, and the delivery timeline read from the delivery log."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from django import forms
from django.contrib import messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from notifications import sending, services, templating, unsubscribe
from notifications.models import CHANNEL_ORDER, ApiKey, Channel, Delivery, Recipient, Template

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin


class PrettyJSONField(forms.JSONField):
    """A JSON field shown indented, one key a line, so a person can read and edit it;
    `arrange` puts the keys in a readable order first."""

    def __init__(self, *args: Any, arrange: Callable[[Any], Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.arrange = arrange

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        if self.arrange is not None:
            value = self.arrange(value)
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)


def content_in_channel_order(content: Any) -> Any:
    """Channels in their usual order, each with its fields in the documented order
    (PostgreSQL's jsonb keeps neither the order they were written in)."""
    if not isinstance(content, dict):
        return content
    rank = {channel: i for i, channel in enumerate(CHANNEL_ORDER)}
    arranged = {}
    for channel in sorted(content, key=lambda c: (rank.get(c, len(rank)), c)):
        fields = content[channel]
        spec = list(templating.CHANNEL_FIELDS.get(channel, {}))
        if isinstance(fields, dict):
            fields = {
                name: fields[name]
                for name in sorted(fields, key=lambda f: (spec.index(f) if f in spec else 99, f))
            }
        arranged[channel] = fields
    return arranged


def translations_in_channel_order(translations: Any) -> Any:
    if not isinstance(translations, dict):
        return translations
    return {
        locale: content_in_channel_order(translations[locale]) for locale in sorted(translations)
    }


def notification_link(notification_id: Any) -> str:
    """A link to a notification's page showing the first eight characters of its id (the
    whole id in the tooltip): enough to tell rows apart without widening every list."""
    url = reverse("admin:notifications_notification_change", args=[notification_id])
    return format_html(
        '<a href="{}" title="{}">{}…</a>', url, notification_id, str(notification_id)[:8]
    )


# --- Live preview ---------------------------------------------------------------------------


def _json_object(
    name: str, text: str, errors: dict[str, list[str]], *, example: str
) -> dict[str, Any] | None:
    """The JSON object in `text` (blank is {}), or None with a message in `errors`."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        errors[name] = [f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."]
        return None
    if not isinstance(value, dict):
        errors[name] = [f"Must be a JSON object, e.g. {example}."]
        return None
    return value


def template_preview_render(
    *,
    content: str,
    translations: str,
    sample_data: str,
    default_locale: str,
    locale: str,
    channel: str,
) -> dict[str, Any]:
    """Render unsaved template text the way notification_create would, one channel at a
    time so that an error in one channel still lets the others show. Never raises on
    operator input: every problem comes back as a message keyed by the field it is in."""
    errors: dict[str, list[str]] = {}
    content_doc = _json_object(
        "content", content, errors, example='{"sms": {"body": "Hi {{ name }}"}}'
    )
    translations_doc = _json_object(
        "translations", translations, errors, example='{"fr": {"sms": {"body": "..."}}}'
    )
    data = _json_object("sample_data", sample_data, errors, example='{"name": "Ada"}')
    result: dict[str, Any] = {"ok": False, "locale": None, "errors": errors, "channels": {}}
    if content_doc is not None and not content_doc:
        errors["content"] = ["Add at least one channel: email, sms, push or web."]
    if not content_doc or data is None:
        return result

    usable_translations = {
        name: value for name, value in (translations_doc or {}).items() if isinstance(value, dict)
    }
    default_locale = default_locale.strip() or "en"
    used_locale, merged = templating.pick_locale_content(
        default_locale=default_locale,
        content=content_doc,
        translations=usable_translations,
        wanted=locale.strip(),
    )
    result["locale"] = used_locale
    if translations_doc:
        try:
            templating.validate_translations(translations_doc)
        except templating.TemplateError as exc:
            # The chosen locale's own problems are reported with its channels below.
            mine = f"translations.{used_locale}."
            errors.update({k: v for k, v in exc.fields.items() if not k.startswith(mine)})

    known = [c for c in CHANNEL_ORDER if c in merged]
    wanted = [channel] if channel else known + sorted(set(merged) - set(known))
    for name in wanted:
        if name not in merged:
            result["channels"][name] = {
                "ok": False,
                "errors": {f"content.{name}": ["This template has no content for this channel."]},
            }
            continue
        from_translation = used_locale != default_locale and name in usable_translations.get(
            used_locale, {}
        )
        path = f"translations.{used_locale}" if from_translation else "content"
        result["channels"][name] = _render_one(name, merged[name], data, path)
    result["ok"] = not errors and all(c["ok"] for c in result["channels"].values())
    return result


def _render_one(channel: str, fields: Any, data: dict[str, Any], path: str) -> dict[str, Any]:
    try:
        templating.validate_content({channel: fields}, path=path)
        rendered = templating.render_channel(
            channel,
            fields,
            unsubscribe.render_data(
                channel=channel,
                fields=fields,
                data=data,
                owner_id=0,
                recipient_id=None,
                category="",
            ),
        )
    except templating.TemplateError as exc:
        return {"ok": False, "errors": exc.fields}
    except jinja2.TemplateError as exc:
        # Whatever else Jinja refuses at render time is the operator's to fix, not a 500.
        return {"ok": False, "errors": {f"{path}.{channel}": [f"Cannot render: {exc}"]}}
    order = list(templating.CHANNEL_FIELDS[channel])
    return {"ok": True, "fields": {k: rendered[k] for k in order if k in rendered}}


def template_preview_view(request: HttpRequest, model_admin: ModelAdmin[Template]) -> HttpResponse:
    """POST the form's raw texts, get the rendered channels back as JSON (always a 200 for
    operator mistakes, so the page can show them)."""
    if not (model_admin.has_change_permission(request) or model_admin.has_add_permission(request)):
        raise PermissionDenied
    if request.method != "POST":
        return JsonResponse({"error": "method_not_allowed", "detail": "Use POST."}, status=405)
    form = request.POST
    return JsonResponse(
        template_preview_render(
            content=form.get("content", ""),
            translations=form.get("translations", ""),
            sample_data=form.get("sample_data", ""),
            default_locale=form.get("default_locale", ""),
            locale=form.get("locale", ""),
            channel=form.get("channel", ""),
        )
    )


# --- Send a test ----------------------------------------------------------------------------


class SendTestForm(forms.Form):
    recipient = forms.CharField(
        label="Recipient id",
        max_length=255,
        help_text="The recipient's id as your services know it, e.g. user-42.",
    )
    channels = forms.MultipleChoiceField(
        choices=Channel.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Leave all unticked to use every channel the template has.",
    )
    sample_data = PrettyJSONField(
        label="Sample data",
        required=False,
        widget=forms.Textarea(attrs={"rows": 8, "cols": 80}),
        help_text="The template's variables; starts as the template's saved sample data.",
    )

    def __init__(self, *args: Any, template: Template, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.template = template

    def clean_recipient(self) -> str:
        external_id = str(self.cleaned_data["recipient"]).strip()
        if not Recipient.objects.filter(
            owner_id=self.template.owner_id, external_id=external_id
        ).exists():
            raise forms.ValidationError(
                f"No recipient '{external_id}' belongs to {self.template.owner}."
            )
        return external_id

    def clean_sample_data(self) -> dict[str, Any]:
        data = self.cleaned_data.get("sample_data")
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise forms.ValidationError('Must be a JSON object, e.g. {"order_id": "A-1"}.')
        return data


def template_send_test_view(
    request: HttpRequest, model_admin: ModelAdmin[Template], object_id: str
) -> HttpResponse:
    """Send the saved template to one recipient through notification_create (priority
    normal) and report the notification with a link to its timeline."""
    # get_object, unlike a plain get, answers None (a 404) for an id that is not a number.
    template = model_admin.get_object(request, unquote(object_id))
    if template is None:
        raise Http404(f"No template with id {object_id!r}.")
    if not model_admin.has_change_permission(request, template):
        raise PermissionDenied
    if request.method == "POST":
        form = SendTestForm(request.POST, template=template)
        if form.is_valid():
            try:
                body = sending.notification_create(
                    owner=template.owner,
                    recipient=form.cleaned_data["recipient"],
                    template_key=template.key,
                    data=form.cleaned_data["sample_data"],
                    channels=form.cleaned_data["channels"] or None,
                )
            except services.ValidationFailed as exc:
                for field, problems in exc.fields.items():
                    # "data.order_id" belongs under the sample data; anything else on top.
                    head = field.split(".")[0]
                    target = {"recipient": "recipient", "data": "sample_data"}.get(head)
                    form.add_error(target, [f"{field}: {p}" for p in problems])
            else:
                url = reverse("admin:notifications_notification_change", args=[body["id"]])
                outcome = ", ".join(
                    f"{d['channel']} {d['status']}"
                    + (f" ({d['reason'].replace('_', ' ')})" if "reason" in d else "")
                    for d in body["deliveries"]
                )
                messages.success(
                    request,
                    format_html(
                        'Test notification <a href="{}">{}</a> accepted: {}.',
                        url,
                        body["id"],
                        outcome,
                    ),
                )
                return HttpResponseRedirect(
                    reverse("admin:notifications_template_change", args=[template.pk])
                )
    else:
        form = SendTestForm(template=template, initial={"sample_data": template.sample_data})
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"Send a test of {template.key}",
        "opts": model_admin.opts,
        "original": template,
        "form": form,
        "has_view_permission": True,
    }
    return TemplateResponse(request, "admin/notifications/template/send_test.html", context)


# --- API key shown once ---------------------------------------------------------------------


def api_key_created_response(
    request: HttpRequest, model_admin: ModelAdmin[ApiKey], api_key: ApiKey, raw_key: str
) -> HttpResponse:
    """The page that shows a new key: rendered straight into the POST's answer, so the raw
    key is never put in the session, a message or a URL (and the admin sends no-store)."""
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "API key created",
        "opts": model_admin.opts,
        "api_key": api_key,
        "raw_key": raw_key,
        "has_view_permission": True,
    }
    return TemplateResponse(request, "admin/notifications/apikey/created.html", context)


# --- Delivery timeline ----------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineEntry:
    """A status change or a provider attempt of one delivery, in time order."""

    at: datetime
    channel: str
    delivery_id: int
    kind: str  # "status" or "attempt"
    status: str  # the status entered, or the attempt's outcome
    provider: str
    detail: str  # the attempt's error and HTTP status, or the status event's detail
    latency_ms: float | None


def delivery_timeline(
    *, notification_id: str, deliveries: list[Delivery], only_delivery: int | None = None
) -> list[TimelineEntry]:
    """Every status event and attempt of the notification's deliveries (or of one), read
    through the delivery log so it shows the same with the SQL and Cassandra backends."""
    from notifications.delivery_log import get_delivery_log

    log = get_delivery_log()
    wanted = [d.pk for d in deliveries if only_delivery in (None, d.pk)]
    channels = {d.pk: d.channel for d in deliveries}
    entries = [
        TimelineEntry(
            at=a.started_at,
            channel=a.channel,
            delivery_id=a.delivery_id,
            kind="attempt",
            status=f"attempt {a.number}: {a.outcome}",
            provider=a.provider,
            detail=" ".join(
                part for part in (f"HTTP {a.status_code}" if a.status_code else "", a.error) if part
            ),
            latency_ms=round(a.latency_ms, 1),
        )
        for attempts in log.attempts_for_deliveries(
            notification_id=notification_id, delivery_ids=wanted
        ).values()
        for a in attempts
    ]
    entries += [
        TimelineEntry(
            at=e.at,
            channel=channels.get(e.delivery_id, e.channel),
            delivery_id=e.delivery_id,
            kind="status",
            status=e.status,
            provider="",
            detail=e.detail,
            latency_ms=None,
        )
        for e in log.events_for_notification(notification_id=notification_id)
        if e.delivery_id in wanted
    ]
    # An attempt starts before the status it leads to, even within the same clock tick.
    return sorted(entries, key=lambda t: (t.at, t.kind != "attempt", t.delivery_id))


def timeline_html(entries: list[TimelineEntry]) -> str:
    if not entries:
        return format_html("<p>{}</p>", "Nothing recorded yet.")
    rows = format_html_join(
        "\n",
        '<tr class="clarion-timeline-{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
        "<td>{}</td><td>{}</td></tr>",
        (
            (
                t.kind,
                t.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                f"{t.channel} #{t.delivery_id}",
                t.status,
                t.provider or "",
                t.detail or "",
                f"{t.latency_ms} ms" if t.latency_ms is not None else "",
            )
            for t in entries
        ),
    )
    return format_html(
        '<table class="clarion-timeline"><thead><tr><th>time (UTC)</th><th>delivery</th>'
        "<th>status</th><th>provider</th><th>error / detail</th><th>latency</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        rows,
    )
