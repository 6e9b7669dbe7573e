"""Template validation and rendering: a sandboxed Jinja environment where an undefined
variable is an error that names it, and email HTML is autoescaped."""

from __future__ import annotations

import operator
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

# Fields each channel's content may carry, and the ones it must.
CHANNEL_FIELDS: dict[str, dict[str, bool]] = {
    "email": {"subject": True, "body": False, "html": False},
    "sms": {"body": True},
    "push": {"title": True, "body": True, "url": False},
    "web": {"title": True, "body": True, "url": False},
}
HTML_FIELDS = {("email", "html")}
# Longest rendered value; a template that multiplies strings past this is refused.
MAX_RENDERED_CHARS = 100_000


class TemplateError(Exception):
    """A template that cannot be saved or rendered; `fields` maps a field path to messages."""

    def __init__(self, fields: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items()))
        self.fields = fields


class _Environment(SandboxedEnvironment):
    # Guard the two operators that let a template allocate without bound.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > 100:
                raise SecurityError("exponent too large")
            return operator.pow(left, right)
        if isinstance(left, str) or isinstance(right, str):
            count = right if isinstance(left, str) else left
            if (
                isinstance(count, int)
                and count * len(str(left if isinstance(left, str) else right)) > MAX_RENDERED_CHARS
            ):
                raise SecurityError("string repetition too large")
        return operator.mul(left, right)


_text_env = _Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_html_env = _Environment(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


def _env(channel: str, field: str) -> _Environment:
    return _html_env if (channel, field) in HTML_FIELDS else _text_env


@lru_cache(maxsize=4096)
def _parse(source: str, html: bool) -> tuple[Any, frozenset[str]]:
    env = _html_env if html else _text_env
    ast: nodes.Template = env.parse(source)
    variables = frozenset(meta.find_undeclared_variables(ast))
    return env.from_string(ast), variables


def validate_content(content: Any, *, path: str = "content") -> None:
    """Raise TemplateError unless `content` is a valid per-channel content mapping."""
    errors: dict[str, list[str]] = {}
    if not isinstance(content, dict) or not content:
        raise TemplateError({path: ["Must be an object with at least one channel."]})
    for channel, fields in content.items():
        where = f"{path}.{channel}"
        spec = CHANNEL_FIELDS.get(channel)
        if spec is None:
            errors[where] = [f"Unknown channel; use one of {', '.join(CHANNEL_FIELDS)}."]
            continue
        if not isinstance(fields, dict):
            errors[where] = ["Must be an object."]
            continue
        for name in fields:
            if name not in spec:
                errors.setdefault(f"{where}.{name}", []).append("Unknown field.")
        for name, required in spec.items():
            if required and not fields.get(name):
                errors.setdefault(f"{where}.{name}", []).append("This field is required.")
        if channel == "email" and not (fields.get("body") or fields.get("html")):
            errors.setdefault(f"{where}.body", []).append("An email needs a body or html.")
        for name, source in fields.items():
            if name not in spec:
                continue
            if not isinstance(source, str):
                errors.setdefault(f"{where}.{name}", []).append("Must be a string.")
                continue
            try:
                _parse(source, (channel, name) in HTML_FIELDS)
            except TemplateSyntaxError as exc:
                errors.setdefault(f"{where}.{name}", []).append(
                    f"Template syntax error on line {exc.lineno}: {exc.message}"
                )
    if errors:
        raise TemplateError(errors)


def locale_normalize(tag: str) -> str:
    """`pt_BR`, `pt-br` and `PT-BR` are the same locale: lower case, subtags joined by `-`."""
    return "-".join(part for part in tag.strip().lower().replace("_", "-").split("-") if part)


def locale_chain(tag: str) -> list[str]:
    """Most specific first: `zh-Hant-TW` → `zh-hant-tw`, `zh-hant`, `zh`."""
    parts = locale_normalize(tag).split("-") if tag.strip() else []
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


def validate_translations(translations: Any) -> None:
    if not isinstance(translations, dict):
        raise TemplateError({"translations": ["Must be an object keyed by locale."]})
    errors: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for locale, content in translations.items():
        normal = locale_normalize(locale)
        if not normal:
            errors[f"translations.{locale}"] = ["A locale is a language tag such as fr or pt-BR."]
            continue
        if normal in seen:
            errors[f"translations.{locale}"] = [
                f"Same locale as '{seen[normal]}' (case and _ or - do not matter)."
            ]
            continue
        seen[normal] = locale
        try:
            validate_content(content, path=f"translations.{locale}")
        except TemplateError as exc:
            errors.update(exc.fields)
    if errors:
        raise TemplateError(errors)


def pick_locale_content(
    *, default_locale: str, content: dict, translations: dict, wanted: str
) -> tuple[str, dict]:
    """Content for the recipient's locale along its fallback chain: `pt-BR`, then `pt`, then
    the template's default locale (`pt_BR`, `pt-br` and `PT-BR` are one locale). A channel
    missing from the most specific translation comes from the next one in the chain, and
    finally from the default content. Returns the most specific locale used, as the template
    spells it."""
    if not (wanted and translations):
        return default_locale, content
    by_normal = {locale_normalize(k): k for k in translations}
    default = locale_normalize(default_locale)
    found: list[str] = []
    for candidate in locale_chain(wanted):
        if candidate == default:
            break
        if candidate in by_normal:
            found.append(by_normal[candidate])
    if not found:
        return default_locale, content
    merged = dict(content)
    for locale in reversed(found):
        merged.update(translations[locale])
    return found[0], merged


def render_channel(channel: str, fields: dict[str, str], data: dict[str, Any]) -> dict[str, str]:
    """Render one channel's fields with `data`; TemplateError names what is missing."""
    missing: set[str] = set()
    compiled = {}
    for name, source in fields.items():
        template, variables = _parse(source, (channel, name) in HTML_FIELDS)
        missing |= variables - data.keys()
        compiled[name] = template
    if missing:
        raise TemplateError(
            {f"data.{name}": ["Missing template variable."] for name in sorted(missing)}
        )
    rendered = {}
    for name, template in compiled.items():
        where = f"content.{channel}.{name}"
        try:
            value = template.render(data)
        except UndefinedError as exc:
            raise TemplateError({"data": [f"{where}: {exc.message}"]}) from exc
        except SecurityError as exc:
            raise TemplateError({where: [f"Not allowed in a template: {exc}"]}) from exc
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError({where: [f"Template could not be rendered: {exc}"]}) from exc
        if len(value) > MAX_RENDERED_CHARS:
            raise TemplateError({where: ["Rendered value is too long."]})
        rendered[name] = value
    return rendered


def digest_data(events: list[dict[str, Any]], key: str = "") -> dict[str, Any]:
    """What a digest template sees: the newest event's own data at the top level, and
    `events` (every event's data, oldest first), `count` and `digest_key`."""
    return {
        **(events[-1] if events else {}),
        "events": events,
        "count": len(events),
        "digest_key": key,
    }


def render_key(source: str, data: dict[str, Any], *, where: str) -> str:
    """A one-line text template (a digest key): TemplateError names a missing variable."""
    try:
        template, variables = _parse(source, False)
    except TemplateSyntaxError as exc:
        raise TemplateError({where: [f"Template syntax error: {exc.message}"]}) from exc
    missing = variables - data.keys()
    if missing:
        raise TemplateError(
            {f"data.{name}": ["Missing template variable."] for name in sorted(missing)}
        )
    try:
        return str(template.render(data)).strip()
    except (
        UndefinedError,
        SecurityError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
    ) as exc:
        raise TemplateError({where: [f"Template could not be rendered: {exc}"]}) from exc
