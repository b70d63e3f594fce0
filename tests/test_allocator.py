"""forvalue.engine.allocator: the ``forvalue`` program's malloc keeps freed large blocks (fewer first-touch faults)."""

import os
import subprocess
import sys

import pytest

# A child process: optionally the program's setting, then a 48 MB array (above glibc's largest mmap threshold) made
# and dropped three times; prints the minor page faults of the last two (fresh pages fault again, kept pages do not;
# with transparent huge pages a fault is a 2 MB page: still ~25 per array against none).
CHILD = """
import resource, sys
import numpy as np
from forvalue.engine.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "set" else None)
def faults_of_one():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(6 << 20)  # 48 MB, touched
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults_of_one()
print(faults_of_one() + faults_of_one())
"""


def _child(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env={**environ, **env}
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_blocks_are_reused():
    _, default = _child("none")
    was_set, kept = _child("set")
    assert was_set == "True"
    assert default >= 8  # glibc's default: a fresh mapping each time, its pages faulted again
    assert kept * 4 < default  # kept on the heap: the later arrays reuse the first's pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_users_own_malloc_settings_are_left_alone():
    was_set, faults = _child("set", MALLOC_MMAP_THRESHOLD_="131072")
    assert was_set == "False"
    assert faults >= 8


def test_the_program_sets_it_before_the_cli_is_imported():
    from pathlib import Path

    import forvalue.__main__ as entry

    source = Path(entry.__file__).read_text()
    assert source.index("keep_freed_memory()") < source.index("from forvalue.cli import main")
