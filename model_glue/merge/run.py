"""``glue merge CONFIG OUT``: the command-line entry, wired into the CLI by ``model_glue.cli``."""

from __future__ import annotations

import sys
from pathlib import Path

from model_glue.merge.config import load_merge_config
from model_glue.merge.engine import merge_to_directory


def run_merge_file(config_path: str, out_dir: str, *, progress: bool = True) -> Path:
    """Merge as ``config_path`` says into ``out_dir``; prints progress to stderr."""
    spec = load_merge_config(config_path)
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct // 10 != last[0] // 10 or done == total:
            print(
                f"merge {spec.method}: {done}/{total} tensors ({pct}%)", file=sys.stderr, flush=True
            )
        last[0] = pct

    result = merge_to_directory(spec, out_dir, progress=report if progress else None)
    if progress:
        print(
            f"wrote {result.out_dir} ({result.num_parameters:,} parameters, {result.seconds:.1f} s)",
            file=sys.stderr,
        )
    return result.out_dir
