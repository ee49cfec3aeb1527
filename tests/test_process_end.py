"""How a vermeer process ends: one that joined a process group skips the interpreter's
finalisation (``end_process``; why: its docstring), after flushing what it printed; any other
process ends with a plain ``SystemExit``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

JOINED = textwrap.dedent("""
    import atexit, logging, sys
    from vermeer_core.distributed import end_process, init_distributed, shutdown
    atexit.register(lambda: print("finalised", flush=True))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    init_distributed(device="cpu")
    shutdown()
    sys.stdout.write("unflushed output")   # no newline, no flush: end_process must flush it
    logging.getLogger("t").info("a log line")
    end_process(3)
""")


def test_a_process_that_joined_a_group_flushes_and_skips_finalisation() -> None:
    r = subprocess.run([sys.executable, "-c", JOINED], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stdout == "unflushed output"  # flushed; the atexit handler did not run
    assert "a log line" in r.stderr


def test_a_process_that_joined_no_group_ends_with_system_exit() -> None:
    # in a subprocess: this pytest process may have joined a group in another test
    code = 'import atexit; atexit.register(lambda: print("finalised")); from vermeer_core.distributed import end_process; end_process(4)'
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr[-2000:]
    assert r.stdout == "finalised\n"
