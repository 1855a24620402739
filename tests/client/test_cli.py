"""The ``qkvault`` command line: exit codes, messages, and commands that need no server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qkvault.cli import _split_job_url, build_parser, main
from qkvault.embedded import free_port


def test_show_prints_the_summary(
    make_bundle: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(make_bundle("zip")), "--top", "2", "--layer", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qkvault bundle, format 1.0")
    assert "layer 0, head 0 (top 2 keys)" in out


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "abc", "--api", dead, "--http-timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: GET /v1/jobs/abc: cannot reach the qkvault API at " + dead)

    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    assert main(["--api", dead, "submit", str(bad)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err

    assert main(["show", str(tmp_path / "missing.zip")]) == 1
    assert "bundle not found" in capsys.readouterr().err


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["status"])  # missing ID: argparse exits 2
    assert info.value.code == 2


def test_global_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--api", "http://a:1", "--home", "/h", "list"])
    after = parser.parse_args(["list", "--api", "http://a:1", "--home", "/h"])
    for args in (before, after):
        assert (args.api, args.home, args.http_timeout) == ("http://a:1", "/h", 30.0)
    plain = parser.parse_args(["list"])
    assert (plain.api, plain.home) == (None, None)


def test_job_urls() -> None:
    assert _split_job_url("http://h:8000/v1/jobs/abc") == ("http://h:8000", "abc")
    assert _split_job_url("https://h/qk/v1/jobs/abc/bundle") == ("https://h/qk", "abc")
    assert _split_job_url("http://h:8000/healthz") is None
