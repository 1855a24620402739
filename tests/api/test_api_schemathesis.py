"""Property-based: Schemathesis generates requests from the app's own OpenAPI document (bodies,
query strings, headers and path ids that fit the schema, and ones that do not) and sends them
in-process (ASGI) with a valid API key. No answer may be a 5xx (``not_a_server_error``), and every
error must be a problem document.

Bounded and reproducible for CI: ``derandomize=True`` (the same examples every run, no example
database), ``MAX_EXAMPLES`` per operation and generation mode, no deadline. The strategies are
driven with Hypothesis' ``@given`` directly (Schemathesis' pytest plugin does not run under
pytest 9), one operation at a time; failures of all operations are reported together.

Schemathesis draws text UTF-8 can encode and integers of ordinary size, and cannot know what a
list cursor holds. The second test draws those edges with Hypothesis, as a client could send them:
lone UTF-16 surrogates (escaped in JSON, or their bytes in a path or query), NUL characters,
integers past the 64-bit limits (and past Python's 4,300-digit parse limit), in every field of a
full job spec and in every path and query parameter; and tampered ``cursor`` values (random bytes,
not base64, base64 of JSON with out-of-range or naive times, wrong types, deep nesting). Against
the code before the edge checks of ``storage/inputs.py`` and ``storage/index/cursor.py`` it finds
their 500s in its first examples.
"""

from __future__ import annotations

import base64
import copy
import json
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index
from tests.api.support import SMOLLM2

MAX_EXAMPLES = 25
PROBLEM_JSON = "application/problem+json"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_5xx(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str], mode: GenerationMode
) -> None:
    # a job limit above what the run can create, so 429 does not hide the submit path
    app = create_app(api_settings.model_copy(update={"max_jobs_in_flight": 100_000}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # 16 under /v1 (3 of them /v1/uploads, 2 arrays, 2 tiles) + /healthz + /readyz
    assert len(operations) == 18
    calls = 0

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            nonlocal calls
            response = case.call(headers=auth_headers)
            calls += 1
            case.validate_response(response, checks=[not_a_server_error], headers=auth_headers)
            if response.status_code >= 400:
                content_type = response.headers.get("content-type")
                if isinstance(content_type, list):
                    content_type = content_type[0]
                assert content_type == PROBLEM_JSON, response.text

        try:
            check()
        except Unsatisfiable:
            # negative mode: nothing of the operation can be made invalid (e.g. /healthz)
            assert mode is GenerationMode.NEGATIVE and not operation.path.startswith("/v1/jobs"), (
                operation.label
            )
        except Exception as exc:  # collect, so one run shows every operation that fails
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")

    assert not failures, "\n\n".join(failures)
    assert calls >= len(operations) * 5  # the strategies really generated requests


# -- edge values Schemathesis does not generate: lone surrogates, huge integers, tampered cursors --

EDGE_EXAMPLES = 300  # per request family below (spec, list, job)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
SHORT_TEXT = st.text(max_size=6)
WITH_SURROGATE = st.builds(lambda a, s, b: a + s + b, SHORT_TEXT, SURROGATE, SHORT_TEXT)
WITH_NUL = st.builds(lambda a, b: a + "\x00" + b, SHORT_TEXT, SHORT_TEXT)
EDGE_TEXT = st.one_of(WITH_SURROGATE, WITH_NUL, st.text(min_size=256, max_size=600))


def huge_integers(bits: int = 4000) -> st.SearchStrategy[int]:
    """Integers around and past the int64 / uint64 limits, up to ``bits`` bits (4000: 1,205 digits)."""
    return st.one_of(
        st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
        st.integers(min_value=2**64, max_value=2**bits),
        st.integers(min_value=-(2**bits), max_value=-(2**63) + 1),
    )


HUGE_INT = huge_integers()
SMALL_HUGE_INT = huge_integers(300)  # fits a cursor's 512 characters


@dataclass(frozen=True)
class Digits:
    """An integer of more digits than Python's ``int`` parser takes by default (4300): written
    into the JSON text as is."""

    n: int


def _json(value: Any) -> str:
    """JSON text of ``value``; lone surrogates escaped (``"\\ud800"``, valid JSON), Digits raw."""
    if isinstance(value, Digits):
        return "9" * value.n
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value)


# a spec that passes every check (all optional parts used), so a mutated field reaches its own
BASE_SPEC: dict[str, Any] = {
    "model": {"id": SMOLLM2},
    "prompts": ["The capital of France is", "def fibonacci(n):"],
    "generation": {"max_new_tokens": 4, "do_sample": True, "seed": 7, "top_k": 5},
    "capture": {
        "layers": [0, 1],
        "heads": [0, 2],
        "alternatives": True,
        "alternatives_k": 3,
        "generation_steps": [0, 2],
        "query_rows": [[0, 4]],
        "summary": True,
        "induction_probe": {"length": 8, "seed": 3},
    },
    "storage": {"chunk_rows": 64},
    "kv_compression": [{"method": "kivi", "bits": 2, "seed": 1, "group": 32}],
    "label": "edge",
}


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))] + [(path, value)]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [(path, value)]


LEAVES = _leaves(BASE_SPEC)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """BASE_SPEC with one to three leaves replaced: a string by text with a lone surrogate, a NUL or
    too long; a number by a huge integer; anything by either; or a dict given an extra key with a
    lone surrogate in its name."""
    spec = copy.deepcopy(BASE_SPEC)
    for _ in range(draw(st.integers(1, 3))):
        path, old = draw(st.sampled_from(LEAVES))
        parent = spec
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(old, dict):  # a dict node: add a key
            node = parent[path[-1]] if path else spec
            node[draw(WITH_SURROGATE)] = draw(st.one_of(HUGE_INT, WITH_SURROGATE))
            continue
        numbers: st.SearchStrategy[Any] = st.one_of(HUGE_INT, st.builds(Digits, st.integers(4301, 6000)))
        same, other = (EDGE_TEXT, numbers) if isinstance(old, str) else (numbers, EDGE_TEXT)
        parent[path[-1]] = draw(st.one_of(same, same, other))  # mostly of the leaf's own type
    return spec


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


CURSOR_TIMES = st.one_of(
    st.sampled_from(
        [
            "9999-12-31T23:59:59-23:59",  # past datetime's range once converted to UTC
            "0001-01-01T00:00:00+23:59",  # before it
            "9999-12-31T23:59:59.999999+00:00",
            "10000-01-01T00:00:00+00:00",
            "2026-02-30T00:00:00+00:00",
            "2026-01-01T00:00:00",  # naive
            "2026-01-01T00:00:00+99:00",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    WITH_SURROGATE,
    SMALL_HUGE_INT,
)
CURSOR_IDS = st.one_of(
    st.uuids().map(str),
    WITH_SURROGATE,
    WITH_NUL,
    SMALL_HUGE_INT,
    st.none(),
    st.lists(st.integers(), max_size=2),
)
CURSOR_PAYLOADS = st.one_of(
    st.tuples(CURSOR_TIMES, CURSOR_IDS).map(list),
    st.lists(st.one_of(CURSOR_TIMES, CURSOR_IDS), max_size=4),  # wrong length
    st.recursive(
        st.none() | st.booleans() | SMALL_HUGE_INT | SHORT_TEXT | st.floats(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SHORT_TEXT, inner, max_size=3),
        max_leaves=8,
    ),
)
TAMPERED_CURSORS = st.one_of(
    CURSOR_PAYLOADS.map(lambda p: _b64(_json(p).encode())),  # well-formed base64 of bad JSON
    st.builds(lambda n: _b64(b"[" + b"9" * n + b',"x"]'), st.integers(4301, 5000)),  # over 512 chars
    st.builds(lambda n: _b64(b"[" * n + b"]" * n), st.integers(1, 190)),  # deep nesting
    st.binary(max_size=96).map(_b64),  # random bytes
    st.text(max_size=96),  # not base64 at all
)


def _query(params: dict[str, Any]) -> str:
    """A query string of any text: a lone surrogate goes as its (invalid) UTF-8 bytes, escaped."""
    return "&".join(
        f"{k}={urllib.parse.quote(str(v).encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in params.items()
    )


QUERY_VALUES = st.one_of(EDGE_TEXT, HUGE_INT, TAMPERED_CURSORS)
JOB_IDS = st.one_of(
    st.just("existing"), st.just("existing"), st.uuids().map(str), EDGE_TEXT, HUGE_INT.map(str)
)
JOB_ROUTES = st.sampled_from(
    [
        ("GET", "", ()),
        ("POST", "/cancel", ()),
        ("GET", "/chunks", ("array",)),
        ("GET", "/bundle", ()),
        ("GET", "/bundle/urls", ("expires_in", "prefix")),
    ]
)


@st.composite
def edge_requests(draw: st.DrawFn) -> tuple[str, str, str, bytes | None]:
    """(family, method, URL, JSON body) of one request with edge values."""
    family = draw(st.sampled_from(["spec", "list", "job"]))
    if family == "spec":
        url = draw(st.sampled_from(["/v1/jobs", "/v1/jobs?dry_run=true", "/v1/jobs/estimate"]))
        return family, "POST", url, _json(draw(mutated_specs())).encode()
    if family == "list":  # limit and state mostly valid, so that the cursor is what gets checked
        params = {"cursor": draw(TAMPERED_CURSORS)}
        for name, valid in (("limit", st.integers(1, 100)), ("state", st.sampled_from(["queued", "failed"]))):
            kind = draw(st.sampled_from(["absent", "valid", "absent", "edge"]))
            if kind != "absent":
                params[name] = draw(valid if kind == "valid" else QUERY_VALUES)
        return family, "GET", f"/v1/jobs?{_query(params)}", None
    job_id = draw(JOB_IDS)
    method, suffix, names = draw(JOB_ROUTES)
    params = {name: draw(QUERY_VALUES) for name in names if draw(st.booleans())}
    path = urllib.parse.quote(job_id.encode("utf-8", "surrogatepass"), safe="")
    return family, method, f"/v1/jobs/{path}{suffix}" + (f"?{_query(params)}" if params else ""), None


@pytest.mark.slow
def test_surrogates_huge_integers_and_tampered_cursors_never_answer_5xx(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> None:
    """Every body field of a full spec, every path and query parameter and the list cursor get
    the values JSON and URLs can carry but the code behind them may not take."""
    app = create_app(api_settings.model_copy(update={"max_jobs_in_flight": 100_000}))
    sent: Counter[str] = Counter()
    with TestClient(app, raise_server_exceptions=False, headers=auth_headers) as client:
        created = client.post("/v1/jobs", json=BASE_SPEC)
        assert created.status_code == 202, created.text  # the base spec is valid: mutations reach deep
        existing = created.json()["id"]

        @given(request=edge_requests())
        @settings(
            max_examples=EDGE_EXAMPLES * 3,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(request: tuple[str, str, str, bytes | None]) -> None:
            family, method, url, body = request
            url = url.replace("/existing", f"/{existing}")
            headers = {"Content-Type": "application/json"} if body is not None else {}
            response = client.request(method, url, content=body, headers=headers)
            sent[family] += 1
            sent[f"{family} {response.status_code}"] += 1
            assert response.status_code < 500, (method, url, body and body[:500], response.text[:2000])
            if response.status_code >= 400:
                assert response.headers["content-type"] == PROBLEM_JSON, response.text

        check()
    print(dict(sorted(sent.items())))
    assert min(sent[f] for f in ("spec", "list", "job")) >= EDGE_EXAMPLES // 2, sent
    assert sent["list 400"] > 0 and sent["spec 422"] > 0  # the cursor check and validation answered
