"""``/openapi.json``: built from the route table and the pydantic models, never by hand."""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel, TypeAdapter

from tracker import __version__
from tracker.models import ErrorOut

REF = "#/components/schemas/{model}"
ERRORS = {"400": "Malformed request", "401": "Missing or bad API key", "403": "Admin only",
          "404": "Not found",
          "409": "Conflict", "413": "Body too large", "415": "Not JSON",
          "422": "Validation error", "503": "Letta or the database unavailable"}


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a type; nested models are hoisted into ``components``."""
    schema = TypeAdapter(tp).json_schema(ref_template=REF, mode="serialization")
    components.update(schema.pop("$defs", {}))
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "title" in schema:
        components[tp.__name__] = schema
        return {"$ref": REF.format(model=tp.__name__)}
    return schema


def _parameters(route: Any, components: dict[str, Any]) -> list[dict[str, Any]]:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", route.path)]
    if route.query is not None:
        props = route.query.model_json_schema(ref_template=REF)
        components.update(props.pop("$defs", {}))
        for name, field in route.query.model_fields.items():
            many = "list" in str(field.annotation)
            param = {"name": name, "in": "query", "required": field.is_required(),
                     "schema": props["properties"][name],
                     "description": field.description or ""}
            if many:
                param.update(style="form", explode=True)
            params.append(param)
    return params


def _media(route: Any) -> str:
    """Text routes (Prometheus metrics) are declared as such; the rest answer JSON."""
    return "text/plain" if route.response is str else "application/json"


def _operation(route: Any, components: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "", "content": {"application/json": {
        "schema": _schema(ErrorOut, components)}}}
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.handler.__name__}_{route.method.lower()}"
                       + ("_slash" if route.path.endswith("/") else ""),
        "parameters": _parameters(route, components),
        "responses": {
            "200" if route.method == "GET" or route.handler.__name__ != "redeliver" else "202": {
                "description": "OK",
                "content": {_media(route): {"schema": _schema(route.response, components)}}},
            **{code: dict(error, description=text) for code, text in ERRORS.items()},
        },
    }
    if route.body is not None:
        op["requestBody"] = {"required": route.handler.__name__ != "cancel", "content": {
            "application/json": {"schema": _schema(route.body, components)}}}
    if route.public:
        op["security"] = []
    return op


@functools.cache
def _document(routes: tuple) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tracker", "version": __version__,
                 "description": "Letta-compatible run tracker: every message reaches its agent "
                                "exactly once, in order, and every result is recorded."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


def document(routes: list) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (computed once per process)."""
    return _document(tuple(routes))
