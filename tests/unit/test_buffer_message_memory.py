"""The buffer service keeps message-sized buffers on glibc's heap (``keep_message_buffers``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# In a child interpreter: mallopt is process-wide. Prints the bytes glibc holds in separate
# mappings for a 3 MB block, before and after the call (mallinfo2: glibc >= 2.33).
CHILD = textwrap.dedent("""
    import ctypes, sys
    from buffer.service import keep_message_buffers

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2

    def mapped_while_held(size):  # what holding the block adds to the mapped bytes
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(size)
        mapped = libc.mallinfo2().hblkhd - before
        libc.free(block)
        return mapped

    before = mapped_while_held(3 << 20)
    kept = keep_message_buffers()
    print(before, kept, mapped_while_held(3 << 20), mapped_while_held(48 << 20))
""")


def test_message_buffers_come_from_the_heap_once_the_service_set_glibc_up():
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.fail("this C library has no mallinfo2: the project's machines run glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, check=True)
    before, kept, after, huge = out.stdout.split()
    assert int(before) >= 3 << 20  # glibc's default: a 3 MB request is a mapping of its own
    assert kept == "True" and int(after) == 0  # now it comes from the heap
    assert int(huge) >= 48 << 20  # past the 32 MB threshold requests are still mapped
