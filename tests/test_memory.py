"""retain_freed_memory: glibc then keeps freed blocks in the heap for reuse."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import run_python

from massrl.memory import ENV

# 10 tensors of 4 MiB alive at once, then freed: how many MiB does the heap keep for reuse?
PROBE = """
import ctypes, sys, torch
from massrl.memory import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "on" else False
keep = [torch.empty(1 << 20).fill_(1.0) for _ in range(10)]
del keep
print(applied, libc.mallinfo2().fordblks >> 20)
"""


def _probe(mode: str) -> tuple[bool, int]:
    # a clean environment: variables that libraries set when a run starts in this process would
    # change the child's allocations
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "LANG") if k in os.environ}
    out = run_python(PROBE, mode, env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def _has_mallinfo2() -> bool:
    try:
        import ctypes

        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(),
                    reason="glibc >= 2.33 only")
def test_freed_blocks_stay_in_the_heap_for_reuse():
    applied, kept_on = _probe("on")
    _, kept_off = _probe("off")
    assert applied
    # glibc's defaults map such blocks afresh or trim them away; with the setting all 40 MiB stay
    assert kept_on >= 40 and kept_off < 8, (kept_on, kept_off)


def test_a_users_own_malloc_settings_stand(monkeypatch):
    from massrl.memory import retain_freed_memory

    for key in ENV:  # (a pretrain earlier in this process may have set them)
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert retain_freed_memory() is False
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
