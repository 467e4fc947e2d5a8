"""Huge pages for CPU batches: the `tlkit` command turns them on (tests/test_startup.py checks that `import tlkit`
changes no environment variable)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout.strip().splitlines()[-1]  # after the help text


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="the kernel must hand out transparent huge pages on request (THP mode 'madvise') to see the difference",
)
def test_a_large_batch_allocated_in_the_tlkit_command_sits_on_huge_pages():
    # 32 MiB of float pixels, touched, then the process's anonymous huge-page total in KiB.
    code = (
        "from tlkit.cli import main; main(['--help']); import torch; x = torch.empty(8 << 20).fill_(1.0); "
        "print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))"
    )
    with_the_command_default, opted_out = int(_run(code)), int(_run(code, THP_MEM_ALLOC_ENABLE="0"))
    assert with_the_command_default - opted_out >= 16 * 1024, (with_the_command_default, opted_out)
