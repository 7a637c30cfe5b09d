"""The OpenAPI document: what each route declares it can answer, and what it then answers."""

from __future__ import annotations

import uuid

from openapi_spec_validator import validate as validate_openapi

from tests.test_history import user_key
from tracker.api import ROUTES
from tracker.letta_request import AGENT_ID_PATTERN, RUN_ID_PATTERN
from tracker.openapi import document

SUBMIT = "/v1/agents/{agent_id}/messages/async"
HEALTH_REF = {"$ref": "#/components/schemas/HealthOut"}


def doc() -> dict:
    built = document(ROUTES)
    validate_openapi(built)
    return built


def responses(path: str, method: str = "get") -> dict:
    return doc()["paths"][path][method]["responses"]


def codes(path: str, method: str = "get") -> set[str]:
    return set(responses(path, method)) - {"200", "202"}


def test_public_routes_declare_no_401():
    assert codes("/healthz") == {"503"}
    assert codes("/openapi.json") == set()


def test_healthz_503_is_its_own_shape_not_an_error_body():
    answer = responses("/healthz")["503"]["content"]["application/json"]["schema"]
    assert answer == HEALTH_REF


def test_only_metrics_declares_403():
    with_403 = {(r.method, r.path) for r in ROUTES
                if "403" in codes(r.path, r.method.lower())}
    assert with_403 == {("GET", "/metrics")}


def test_get_routes_declare_no_body_errors():
    for r in ROUTES:
        if r.method == "GET":
            assert not codes(r.path) & {"409", "413", "415"}, r.path


def test_submit_says_it_passes_on_lettas_4xx():
    op = doc()["paths"][SUBMIT]["post"]
    assert "4xx Letta answers" in op["description"]
    assert {"400", "401", "404", "409", "413", "415", "422", "503", "4XX"} <= set(
        op["responses"])


async def test_what_the_service_answers_is_declared(start_tracker, agent):
    """Each refusal the service gives here is one its route declares."""
    t = await start_tracker()
    user = await user_key(t, "ursula")
    run_path = "/v1/runs/{run_id}"
    probes = [
        (run_path, "get", t.get("/v1/runs/run-nope"), 400),
        (run_path, "get", t.get(f"/v1/runs/run-{uuid.uuid4()}"), 404),
        (run_path, "get", t.client.get(f"/v1/runs/run-{uuid.uuid4()}"), 401),
        ("/v1/runs", "get", t.get("/v1/runs", limit=0), 422),
        ("/metrics", "get", t.get("/metrics", key=user), 403),
        (SUBMIT, "post", t.post("/v1/agents/agent-x/messages/async", {"input": "a"}), 422),
        (SUBMIT, "post", t.client.post(f"/v1/agents/{agent}/messages/async", data="{",
                                       headers={"Authorization": f"Bearer {t.key}",
                                                "Content-Type": "application/json"}), 400),
        (SUBMIT, "post", t.client.post(f"/v1/agents/{agent}/messages/async", data="{}",
                                       headers={"Authorization": f"Bearer {t.key}",
                                                "Content-Type": "text/plain"}), 415),
        ("/callbacks/letta/{token}", "post", t.client.post("/callbacks/letta/x", json={}), 404),
        (SUBMIT, "post", t.post(f"/v1/agents/{agent}/messages/async", {"input": "a"},
                                headers={"Idempotency-Key": "k1"}), 200),
        (SUBMIT, "post", t.post(f"/v1/agents/{agent}/messages/async", {"input": "b"},
                                headers={"Idempotency-Key": "k1"}), 409),
    ]
    for path, method, request, status in probes:
        resp = await request
        assert resp.status == status, (path, await resp.text())
        assert str(status) in responses(path, method), (path, status)


def param(path: str, method: str, name: str) -> dict:
    [found] = [p for p in doc()["paths"][path][method]["parameters"] if p["name"] == name]
    return found


def test_submit_documents_idempotency_key():
    header = param(SUBMIT, "post", "Idempotency-Key")
    assert header["in"] == "header" and not header["required"]
    assert "409" in header["description"]


def test_path_ids_have_their_patterns():
    for path in ("/v1/runs/{run_id}", "/v1/runs/{run_id}/deliveries/redeliver"):
        method = "post" if path.endswith("redeliver") else "get"
        run_id = param(path, method, "run_id")
        assert run_id["schema"]["pattern"] == RUN_ID_PATTERN and "400" in run_id["description"]
    agent_id = param(SUBMIT, "post", "agent_id")
    assert agent_id["schema"]["pattern"] == AGENT_ID_PATTERN and "422" in agent_id["description"]


def test_x_api_key_is_documented():
    built = doc()
    assert built["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert {"apiKey": []} in built["security"]


async def test_x_api_key_authenticates(start_tracker):
    t = await start_tracker()
    assert (await t.client.get("/v1/runs", headers={"X-API-Key": t.key})).status == 200
    assert (await t.client.get("/v1/runs", headers={"X-API-Key": "tk_wrong"})).status == 401


def test_completed_via_names_every_value_the_filter_takes():
    schemas = doc()["components"]["schemas"]
    text = schemas["TrackerInfo"]["properties"]["completed_via"]["description"]
    [param_] = [p for p in doc()["paths"]["/v1/runs"]["get"]["parameters"]
                if p["name"] == "completed_via"]
    values = param_["schema"]["anyOf"][0]["enum"]
    assert len(values) == 5 and all(v in text for v in values), text
    assert "url_refused" in schemas["RunOut"]["properties"]["callback_url"]["description"]
