"""What a pod's failed start quotes of its guest's console (the console goes with the pod)."""

from __future__ import annotations

from criserver.backends.microvm.backend import _last_lines

PANIC = """\
[    0.262697] PCI: Fatal: No config space access function found
criserver-init: starting agent root=/dev/vda
hostile-init: PID 1 exits
[    1.362121] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100
[    1.363261] Call Trace:
[    1.364266]  dump_stack_lvl+0x44/0x5c
[    1.367357] R13: 0000000000000001 R14: 0000000000000000 R15: 0000000000000002
[    1.367509]  </TASK>
"""


def test_a_panic_is_quoted_with_what_came_before_not_its_trace() -> None:
    assert _last_lines(PANIC) == (
        "criserver-init: starting agent root=/dev/vda | hostile-init: PID 1 exits | "
        "[    1.362121] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")


def test_an_agent_error_is_quoted_before_later_chatter() -> None:
    console = ("x INFO started\nx ERROR cannot open /dev/vport0p1: No such device\n"
               "x INFO retrying\n")
    assert _last_lines(console, count=1) == "x ERROR cannot open /dev/vport0p1: No such device"


def test_without_a_failure_the_last_lines_cut_to_the_limit() -> None:
    console = "\n".join(f"line {i}" for i in range(10)) + "\n\n"
    assert _last_lines(console) == "line 7 | line 8 | line 9"
    assert _last_lines(console, limit=8) == "| line 9"
    assert _last_lines("") == _last_lines("\n \n") == "(empty)"
