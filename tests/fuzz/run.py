"""Run one fuzz target under atheris (coverage-guided, libFuzzer's engine).

    python -m tests.fuzz.run TARGET [libFuzzer options] [NEW_CORPUS_DIR] [SEED_DIR...]
    python -m tests.fuzz.run --list

The daemon's own modules (and tarfile, which parses layers for it) are instrumented for
coverage. libFuzzer writes new inputs into the first directory it is given: pass a scratch
directory first to keep the committed seeds (tests/fuzz/corpus/TARGET) as they are.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["criserver", "vmagent", "tarfile", "gzip"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*TARGETS, "--list"):
        sys.exit(f"usage: python -m tests.fuzz.run TARGET [libFuzzer args]; targets: "
                 f"{', '.join(TARGETS)}")
    if sys.argv[1] == "--list":
        print("\n".join(TARGETS))
        return
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
