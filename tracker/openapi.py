"""``/openapi.json``: built from the route table and the pydantic models, never by hand."""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel, TypeAdapter

from tracker import __version__
from tracker.letta_request import AGENT_ID_PATTERN, RUN_ID_PATTERN
from tracker.models import ErrorOut

REF = "#/components/schemas/{model}"

# What each route can answer besides its success, by handler (read from api.py, parsing.py,
# callbacks.py and the middlewares): a client is told the errors it must handle, no others.
KEY = {"401": "Missing or bad API key"}
DB = {"503": "The database is unavailable"}
BODY = {"400": "Body is not valid JSON", "413": "Body larger than server.max_body_bytes",
        "415": "Content-Type is not JSON"}
RUN = {"400": "run_id is not run-<uuid4>", "404": "No such run (or not yours)"}
QUERY = {"422": "Query parameters fail validation"}
AGENT_BODY = {"422": "Body fails validation, or agent_id is not agent-<uuid4>"}
ERRORS: dict[str, dict[str, str]] = {
    "submit": {**KEY, **BODY, **DB,
               "400": "Body is not valid JSON (NaN or Infinity included), or Letta's 400",
               "404": "No such agent (Letta's answer, passed on)",
               "409": "Idempotency-Key already used with a different body",
               "422": "Body fails validation, agent_id is not agent-<uuid4>, or callback_url"
                      " is refused (type url_refused)"},
    "cancel": {**KEY, **BODY, **DB, **AGENT_BODY,
               "409": "No run_ids given and the agent has no active run",
               "503": "The database is unavailable, or Letta is (nothing was cancelled there)"},
    "list_runs": {**KEY, **QUERY, **DB,
                  "400": "A before/after cursor names no run you can list",
                  "404": "user_id names another user (a non-admin key)"},
    "get_run": {**KEY, **RUN, **QUERY, **DB},
    "run_messages": {**KEY, **RUN, **QUERY, **DB},
    "run_usage": {**KEY, **RUN, **DB},
    "run_events": {**KEY, **RUN, **DB},
    "run_deliveries": {**KEY, **RUN, **DB},
    "redeliver": {**KEY, **RUN, **DB, "404": "No such run (or not yours), or no delivery"},
    "stats": {**KEY, **DB},
    # the callback reads its body whatever the Content-Type: no 415
    "letta_callback": {**DB, "400": BODY["400"], "413": BODY["413"],
                       "401": "Forged callback token",
                       "404": "Malformed callback token, or no such run",
                       "409": "The body names another Letta run than the token's",
                       "422": "Body is not Letta's callback"},
    "healthz": {"503": "Degraded: the database is unreachable or its last write failed, or a"
                       " background loop stopped by an error is restarting"},
    "metrics": {**KEY, **DB, "403": "Not an admin key"},
    "openapi": {},
}
#: answered with the route's own body, not ErrorOut
OWN_BODY = {("healthz", "503")}
#: routes that pass on Letta's own 4xx, whatever its code, as Letta gave it
PASSED_ON = {"submit": "Any other 4xx Letta answers at submit (its refusal of the run) is"
                       " passed on as Letta gave it, status and body.",
             "cancel": "A 4xx Letta answers to the cancel of runs at Letta is passed on as"
                       " Letta gave it, status and body."}


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a type; nested models are hoisted into ``components``."""
    schema = TypeAdapter(tp).json_schema(ref_template=REF, mode="serialization")
    components.update(schema.pop("$defs", {}))
    if isinstance(tp, type) and issubclass(tp, BaseModel) and "title" in schema:
        components[tp.__name__] = schema
        return {"$ref": REF.format(model=tp.__name__)}
    return schema


#: path parameters checked against a pattern, and what a mismatch answers (parsing.py)
PATH_PARAMS = {
    "agent_id": ({"pattern": AGENT_ID_PATTERN}, "agent-<uuid4>; any other is a 422"),
    "run_id": ({"pattern": RUN_ID_PATTERN},
               "run-<uuid4>, the tracker's run id or Letta's; any other is a 400"),
    "token": ({}, "the per-run token of the callback URL the tracker gave Letta"),
}
#: request headers a handler reads, by handler (api.py)
HEADERS = {"submit": [{
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "Makes a retried submit safe: the same key (per user) with the same body"
                   " answers the run it made, and sends nothing again; with another body, a"
                   " 409"}]}


def _path_parameter(name: str) -> dict[str, Any]:
    schema, text = PATH_PARAMS[name]
    return {"name": name, "in": "path", "required": True, "description": text,
            "schema": {"type": "string", **schema}}


def _parameters(route: Any, components: dict[str, Any]) -> list[dict[str, Any]]:
    params = [_path_parameter(name) for name in re.findall(r"{(\w+)}", route.path)]
    params += HEADERS.get(route.handler.__name__, [])
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


def _responses(route: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The success answer, then the errors this route can give (``ERRORS``)."""
    name = route.handler.__name__
    ok = {"description": "OK", "content": {_media(route): {
        "schema": _schema(route.response, components)}}}
    out = {"202" if name == "redeliver" else "200": ok}
    for code, text in sorted(ERRORS[name].items()):
        shape = route.response if (name, code) in OWN_BODY else ErrorOut
        out[code] = {"description": text, "content": {"application/json": {
            "schema": _schema(shape, components)}}}
    if name in PASSED_ON:
        out["4XX"] = {"description": "Letta's own refusal, passed on", "content": {
            "application/json": {"schema": _schema(ErrorOut, components)}}}
    return out


def _operation(route: Any, components: dict[str, Any]) -> dict[str, Any]:
    name = route.handler.__name__
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{name}_{route.method.lower()}"
                       + ("_slash" if route.path.endswith("/") else ""),
        "parameters": _parameters(route, components),
        "responses": _responses(route, components),
    }
    if name in PASSED_ON:
        op["description"] = PASSED_ON[name]
    if route.body is not None:
        op["requestBody"] = {"required": name != "cancel", "content": {
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
            "bearer": {"type": "http", "scheme": "bearer"},
            # what middleware.bearer also takes, when there is no Authorization: Bearer
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def document(routes: list) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (computed once per process)."""
    return _document(tuple(routes))
