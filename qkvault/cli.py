"""``qkvault`` command line: run the embedded stack, submit and follow jobs, download and show bundles.

Exit codes: 0 success, 1 failure (the message says why), 2 usage error, 130 interrupted.
Heavy modules (httpx, xarray, zarr) are imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qkvault.cli_common import api_client, err, home
from qkvault.cli_stack import cmd_demo, cmd_up


# -- commands ---------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    from qkvault.errors import QkvaultClientError

    source = "standard input" if args.spec == "-" else args.spec
    try:
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        spec = json.loads(text)
    except OSError as exc:
        raise QkvaultClientError(f"cannot read the job spec {source}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise QkvaultClientError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise QkvaultClientError(f"{source} must hold a JSON object (a job spec), not {type(spec).__name__}")
    client = api_client(args)
    if args.prompts_file is not None:
        from qkvault.uploads import with_file_source

        spec, upload = with_file_source(client, spec, args.prompts_file, fmt=args.format, field=args.field)
        if not args.quiet:
            err(f"uploaded {args.prompts_file} ({upload.get('nbytes')} bytes) as upload {upload['id']}")
    elif args.format is not None or args.field is not None:
        raise QkvaultClientError("--format and --field describe --prompts-file: give the file too")
    job = client.submit(spec)
    print(job.id if args.quiet else job, flush=True)
    if args.wait:
        job = client.wait(job.id, timeout_s=args.timeout, progress=not args.quiet, events=not args.poll)
        if not args.quiet:
            print(job, flush=True)
        return 0 if job.succeeded else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(api_client(args).get(args.job_id), flush=True)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job = api_client(args).wait(args.job_id, timeout_s=args.timeout, events=not args.poll)
    print(job, flush=True)
    return 0 if job.succeeded else 1


def cmd_list(args: argparse.Namespace) -> int:
    print(api_client(args).list(state=args.state, limit=args.limit, cursor=args.cursor), flush=True)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    print(api_client(args).cancel(args.job_id), flush=True)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    print(api_client(args).download(args.job_id, args.output), flush=True)
    return 0


def _split_job_url(url: str) -> tuple[str, str] | None:
    """``http://host:8000/v1/jobs/<id>[/bundle]`` -> (``http://host:8000``, ``<id>``)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    for i in range(len(segments) - 2):
        if segments[i] == "v1" and segments[i + 1] == "jobs":
            prefix = "/".join(segments[:i])
            base = f"{parts.scheme}://{parts.netloc}" + (f"/{prefix}" if prefix else "")
            return base, unquote(segments[i + 2])
    return None


def cmd_show(args: argparse.Namespace) -> int:
    from qkvault.bundlefile import open_dataset
    from qkvault.client import Client
    from qkvault.errors import QkvaultClientError
    from qkvault.show import describe_bundle

    target: str = args.target
    if target.startswith(("http://", "https://")):
        split = _split_job_url(target)
        if split is None:
            raise QkvaultClientError(f"{target} is not a job URL (expected .../v1/jobs/<id>)")
        base, job_id = split
        client = Client(base, timeout_s=args.http_timeout, api_key=args.api_key)
        ds = client.open(job_id, download_dir=home(args) / "downloads")
    elif "://" in target or Path(target).exists() or target.endswith((".zip", ".zarr")):
        ds = open_dataset(target)
    else:  # a job id: download through the API once
        ds = api_client(args).open(target, download_dir=home(args) / "downloads")
    print(describe_bundle(ds, layer=args.layer, head=args.head, top=args.top), flush=True)
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from qkvault.labelgrid import render_label_grid
    from storage.bundle import open_summary

    summary = open_summary(args.bundle)
    out = render_label_grid(summary, args.output, title=args.title, batch=args.batch)
    print(f"wrote {out}", flush=True)
    return 0


# -- parser -----------------------------------------------------------------------------------------
def _common_options(top_level: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command. Only the top level holds defaults, so a
    value given before the command is not reset by the command's parser."""

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        metavar="URL",
        default=default(None),
        help="API base URL (default: $QKVAULT_API_BASE_URL, a stack started by `qkvault up` "
        "in --home, else http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--home", metavar="DIR", default=default(None), help="embedded stack directory (default: .qkvault)"
    )
    common.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(None),
        help="API key (default: $QKVAULT_API_KEY, else the key of a stack started by `qkvault up` in --home)",
    )
    common.add_argument(
        "--http-timeout",
        metavar="S",
        type=float,
        default=default(30.0),
        help="timeout of each HTTP call in seconds (default 30)",
    )
    return common


def _poll_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--poll",
        action="store_true",
        help="poll the job every 0.5 s instead of following its live events (GET /v1/jobs/{id}/events; "
        "used by default, with polling as the fallback when the server has none)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(top_level=False)
    parser = argparse.ArgumentParser(
        prog="qkvault",
        parents=[_common_options(top_level=True)],
        description="Export attention, Q/K/V and KV cache from transformer models into Zarr bundles.",
    )
    parser.set_defaults(func=None)
    parser.add_argument("--version", action="version", version="qkvault 0.1.0")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "run the embedded stack (Redis, SQLite, local store, API, 1 worker) until Ctrl-C")
    p.add_argument(
        "--port", type=int, default=None, help="API port (default 8000, or a free one if taken; 0 = any)"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="startup limit in seconds (default 180)",
    )

    p = add(
        "demo", cmd_demo, "start the embedded stack, export SmolLM2 attention + q/k/v, show the bundle, stop"
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, metavar="S", help="job time limit in seconds (default 1800)"
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="startup limit in seconds (default 180)",
    )

    p = add("submit", cmd_submit, "submit a job spec (JSON file, or - for stdin)")
    p.add_argument("spec", metavar="SPEC.json")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish, showing progress")
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S seconds"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    _poll_option(p)
    p.add_argument(
        "--prompts-file",
        metavar="FILE",
        default=None,
        help="upload FILE (JSONL, Parquet or text, one prompt per line) and make it the job's source (a "
        "bulk job); the spec's source options (limit, offset, shuffle_seed, ...) are kept",
    )
    p.add_argument(
        "--format",
        choices=["jsonl", "parquet", "text"],
        default=None,
        help="format of --prompts-file (default: from its extension)",
    )
    p.add_argument(
        "--field", default=None, help="JSONL field / Parquet column of --prompts-file (default: text)"
    )

    p = add("status", cmd_status, "show a job's state and progress")
    p.add_argument("job_id", metavar="ID")

    p = add("wait", cmd_wait, "wait for a job to finish, showing progress (exit 1 unless it succeeded)")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds")
    _poll_option(p)

    p = add("list", cmd_list, "list jobs, newest first")
    p.add_argument("--state", choices=["queued", "running", "cancelling", "cancelled", "succeeded", "failed"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor", default=None, help="next_cursor of the previous page")

    p = add(
        "cancel", cmd_cancel, "cancel a job (a running job stops at its next chunk, keeping what it wrote)"
    )
    p.add_argument("job_id", metavar="ID")

    p = add("download", cmd_download, "download a finished job's bundle zip")
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "-o", "--output", metavar="PATH", default=None, help="file or directory (default ./<id>.zarr.zip)"
    )

    p = add(
        "show", cmd_show, "summarise a bundle: a .zip, a .zarr directory, an s3:// URL, a job URL or a job id"
    )
    p.add_argument("target", metavar="PATH_OR_URL")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="model layer for the attention summary (default: the middle exported one)",
    )
    p.add_argument("--head", type=int, default=0, help="query head for the attention summary (default 0)")
    p.add_argument("--top", type=int, default=5, help="keys to list (default 5)")

    p = add("labels", cmd_labels, "draw a bundle's per-head pattern labels as a layer x head grid (PNG/SVG)")
    p.add_argument("bundle", metavar="PATH", help="a .zip or .zarr bundle captured with summary")
    p.add_argument("-o", "--output", default="labels.png", help="image file (default labels.png)")
    p.add_argument("--batch", type=int, default=None, help="one sequence's labels (default: pooled)")
    p.add_argument("--title", default=None)

    from qkvault.keys_cli import add_keys_parser

    add_keys_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        parser.print_help(sys.stderr)
        return 2

    from qkvault.embedded import EmbeddedStackError
    from qkvault.errors import QkvaultClientError

    try:
        return int(args.func(args) or 0)
    except (QkvaultClientError, EmbeddedStackError) as exc:
        err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
