"""Property-based: Schemathesis generates requests from the app's own OpenAPI document (bodies,
query strings, headers and path ids that fit the schema, and ones that do not) and sends them
in-process (ASGI) with a valid API key. No answer may be a 5xx (``not_a_server_error``), and every
error must be a problem document.

Bounded and reproducible for CI: ``derandomize=True`` (the same examples every run, no example
database), ``MAX_EXAMPLES`` per operation and generation mode, no deadline. The strategies are
driven with Hypothesis' ``@given`` directly (Schemathesis' pytest plugin does not run under
pytest 9), one operation at a time; failures of all operations are reported together.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from api.app import create_app
from api.settings import ApiSettings
from storage.index import Index

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
    assert len(operations) == 10  # 8 under /v1 + /healthz + /readyz
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
