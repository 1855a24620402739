"""``qkvault up`` and ``qkvault demo``: the embedded stack in the foreground, and the demo job."""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from qkvault.cli_common import err, home, settings
from storage.models.spec import SMOLLM2_GGUF

if TYPE_CHECKING:
    from qkvault.client import Client

DEMO_SPEC: dict[str, Any] = {
    "model": {"id": SMOLLM2_GGUF},
    "prompts": [
        "The capital of France is",
        "Attention maps show which earlier tokens each token reads from. In a small language model,",
    ],
    "generation": {"max_new_tokens": 8},
    "capture": {"attention": True, "qkv": True},  # all layers, all heads
    "label": "qkvault demo",
}


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `with EmbeddedStack()` cleans up (no orphans)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_up(args: argparse.Namespace) -> int:
    from qkvault.embedded import EmbeddedStack, port_is_free

    port = args.port
    if port is None:
        port = 8000 if port_is_free(8000) else 0
    with (
        _sigterm_as_exit(),
        EmbeddedStack(
            home(args), api_port=port or None, ready_timeout_s=args.ready_timeout, echo=err
        ) as stack,
    ):
        print(f"qkvault is up: {stack.base_url}   (API docs: {stack.base_url}/docs)", flush=True)
        print(f"  home {stack.home}, logs {stack.logs_dir}", flush=True)
        print(
            f"  API key (owner {stack.api_key_owner!r}): {stack.api_key}   (kept in {stack.api_key_path})",
            flush=True,
        )
        print(f"  commands with the same --home find it; elsewhere: --api {stack.base_url}", flush=True)
        print("Ctrl-C to stop", flush=True)
        try:
            while True:
                stack.check_alive()
                time.sleep(1.0)
        except KeyboardInterrupt:
            err("stopping...")
    err("stopped")
    return 0


def _run_demo(client: Client, downloads: Path, timeout_s: float) -> int:
    from qkvault.bundlefile import bundle_filename
    from qkvault.show import describe_bundle

    job = client.submit(DEMO_SPEC)
    err(
        f"submitted job {job.id}: {SMOLLM2_GGUF}, {len(DEMO_SPEC['prompts'])} prompts, "
        f"8 new tokens, attention + q/k/v of every layer"
    )
    job = client.wait(job.id, timeout_s=timeout_s)
    if not job.succeeded:
        err(f"error: the demo job ended {job.state}\n{job}")
        return 1
    path = client.download(job.id, downloads / bundle_filename(job.id))
    ds = client.open(path)
    print(describe_bundle(ds), flush=True)
    print(
        f"\nbundle: {path}\nopen it in Python:\n"
        f"  import xarray as xr, zarr\n"
        f"  ds = xr.open_zarr(zarr.storage.ZipStore({str(path)!r}, mode='r'), zarr_format=3)",
        flush=True,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qkvault.client import Client
    from qkvault.embedded import EmbeddedStack, local_api_key, running_stack

    home_dir = home(args)
    downloads = home_dir / "downloads"
    if args.api:  # only on request: a QKVAULT_API_BASE_URL set for daily use does not redirect the demo
        client = Client(args.api, timeout_s=args.http_timeout, api_key=args.api_key)
        err(f"qkvault demo against {client.base_url}")
        return _run_demo(client, downloads, args.timeout)
    running = running_stack(home_dir)
    if running:
        err(f"qkvault demo: using the stack already running from {home_dir} ({running['base_url']})")
        key = args.api_key or settings().api_key_value() or local_api_key(home_dir)
        client = Client(running["base_url"], timeout_s=args.http_timeout, api_key=key)
        return _run_demo(client, downloads, args.timeout)
    err(
        f"qkvault demo: starting the embedded stack in {home_dir} (Redis, SQLite, local store, API, 1 worker)"
    )
    with _sigterm_as_exit(), EmbeddedStack(home_dir, ready_timeout_s=args.ready_timeout, echo=err) as stack:
        err(f"stack ready at {stack.base_url}")
        code = _run_demo(stack.client(timeout_s=args.http_timeout), downloads, args.timeout)
        err("demo done; stopping the stack" if code == 0 else "stopping the stack")
    return code
