"""Run one export in a fresh process and print its peak resident memory (used by test_streaming).

python -m tests.worker.memory_probe FOLDER BUNDLE LAYERS PROMPT_TOKENS
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main() -> None:
    folder, bundle, layers, prompt_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from tests.worker.conftest import CollectingHooks
    from tests.worker.export_helpers import export

    spec = {
        "model": {"id": folder},
        "prompts": ["a" * (prompt_tokens - 1)],  # byte tokenizer: one token per byte + BOS
        "capture": {"attention": True, "layers": list(range(layers))},
        "storage": {"chunk_rows": 128},
    }
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds, hooks, _ = export(spec, Path(bundle), hooks=CollectingHooks())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "peak_bytes": peak_kib * 1024,
                "before_bytes": before_kib * 1024,
                "chunks": len(hooks.records),
                "length": int(ds["length"][0]),
            }
        )
    )


if __name__ == "__main__":
    main()
