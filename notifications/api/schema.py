"""drf-spectacular postprocessing hooks that make /api/schema/ read well in Swagger UI and in
generated clients: one tag per resource, the error body on every error answer, the fields
every answer has marked required, and the shared enum components in query parameters too
(settings.SPECTACULAR_SETTINGS lists them)."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

# The v1 API's resources are the first segment after this; the other documented paths (the
# provider hooks, the unsubscribe page) are named by their own first segment.
API_PREFIX = "/api/v1/"
# Segments whose tag should say more than the path does: /hooks/ are the providers' calls in,
# not the status webhooks out (/api/v1/webhooks).
TAG_OF_SEGMENT = {"hooks": "provider-hooks"}
ERROR_COMPONENT = "Error"
# Answer fields the API always sends, which the serializer documenting them does not require
# (it is shared with a request that may leave them out, or DRF's cursor page leaves next and
# previous optional): required in the answer's component, so that a generated client types
# them without Unset. The fuzz test checks every answer has them.
ALWAYS_ANSWERED = {
    "Template": [
        "category",
        "locale",
        "translations",
        "frequency_caps",
        "frequency_cap_scope",
        "escalation",
        "digest",
    ],
    "Preferences": ["channels", "categories", "quiet_hours"],
    "InboxPreferences": ["channels", "categories", "quiet_hours"],
    "PaginatedInboxEntryList": ["next", "previous"],
    "PaginatedSuppressionList": ["next", "previous"],
}

Schema = dict[str, Any]


def resource_tag(path: str) -> str:
    """The tag of every operation on `path`: the resource it is under."""
    rest = path.removeprefix(API_PREFIX) if path.startswith(API_PREFIX) else path.lstrip("/")
    segment = rest.split("/", 1)[0]
    return TAG_OF_SEGMENT.get(segment, segment)


def tag_by_resource(result: Schema, **kwargs: Any) -> Schema:
    """Give each operation the one tag of its path's resource (Swagger UI's sections, the
    generated clients' modules). A path whose tag is not declared with a description in
    SPECTACULAR_SETTINGS["TAGS"] fails the schema, so a new resource cannot go untagged."""
    declared = [tag["name"] for tag in result.get("tags", [])]
    for path, item in result.get("paths", {}).items():
        tag = resource_tag(path)
        if tag not in declared:
            raise ImproperlyConfigured(
                f"{path}: its tag {tag!r} is not in SPECTACULAR_SETTINGS['TAGS'] "
                f"({', '.join(declared)}); declare it there with a description."
            )
        for operation in item.values():
            operation["tags"] = [tag]
    return result


def document_errors(result: Schema, **kwargs: Any) -> Schema:
    """Every 4xx answer documented without a body has the one error body of the API
    (notifications.api.errors.error_body), so a generated client parses it too. The body's
    schema is the Error component, from ErrorSerializer."""
    components = result.get("components", {}).get("schemas", {})
    if ERROR_COMPONENT not in components:
        raise ImproperlyConfigured(
            f"No {ERROR_COMPONENT} component: ErrorSerializer is no longer used by any view."
        )
    body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}}}
    for item in result.get("paths", {}).values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                if str(status).startswith("4") and "content" not in response:
                    response["content"] = body
    return result


def require_answered_fields(result: Schema, **kwargs: Any) -> Schema:
    """Mark ALWAYS_ANSWERED's fields required in their answer components."""
    components = result.get("components", {}).get("schemas", {})
    for name, fields in ALWAYS_ANSWERED.items():
        schema = components.get(name, {})
        unknown = set(fields) - set(schema.get("properties", {}))
        if unknown:
            raise ImproperlyConfigured(
                f"ALWAYS_ANSWERED names what the {name} component does not have: "
                f"{', '.join(sorted(unknown))}."
            )
        schema["required"] = sorted({*schema.get("required", []), *fields})
    return result


def share_parameter_enums(result: Schema, **kwargs: Any) -> Schema:
    """A query parameter whose choices are those of an enum component refers to it, as the
    body fields do (drf-spectacular's postprocess_schema_enums covers components only): one
    ChannelEnum in a generated client, not one more enum per filter."""
    enums = {
        tuple(sorted(schema["enum"])): name
        for name, schema in result.get("components", {}).get("schemas", {}).items()
        if "enum" in schema
    }
    for item in result.get("paths", {}).values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                name = enums.get(tuple(sorted(schema.get("enum", []))))
                if name is None:
                    continue
                ref = {"$ref": f"#/components/schemas/{name}"}
                # A $ref has no siblings in OpenAPI 3.0: a default goes beside an allOf.
                parameter["schema"] = (
                    {"allOf": [ref], "default": schema["default"]} if "default" in schema else ref
                )
    return result
