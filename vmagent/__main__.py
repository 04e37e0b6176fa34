"""`python3 -m vmagent`: the guest's PID 1. Kept tiny: every import before the first health
answer delays pod start-up (under TCG, `import asyncio` alone costs 0.6-0.8 s).
"""

import sys
import time

# Boot-relative start of our own code (the process itself may be older: /init execs us).
_STARTED = time.clock_gettime(time.CLOCK_BOOTTIME)

# asyncio imports ssl when it can; the agent never speaks TLS and ssl costs ~0.2 s under TCG.
if "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]

from vmagent.main import main  # noqa: E402

sys.exit(main(sys.argv[1:], _STARTED))
