"""Steps for tests/engine/test_sandbox.py, run in the sandbox's children: ``main(argv)``."""

import json
import os
import subprocess
import sys
import time

from engine.sandbox import ANSWER


def main(argv: list[str]) -> int:
    what = argv[0]
    if what == "environment":
        answer = {"environment": sorted(os.environ), "cwd": os.getcwd()}
    elif what == "linger":  # leave a grandchild behind, then hang
        grandchild = subprocess.Popen(["sleep", "300"])
        with open("grandchild", "w") as f:
            f.write(str(grandchild.pid))
        time.sleep(300)
        return 0
    elif what == "crash":
        sys.stderr.write("the step gives up\n")
        os.abort()
    elif what == "refuse":
        answer = {"error": "not this one", "field": "labels"}
    elif what == "big":  # a file past the step's limit
        with open("big.bin", "wb") as f:
            f.write(b"\0" * (4 << 20))
        answer = {"wrote": True}
    else:
        answer = {"echo": what, "pid": os.getpid()}
    with open(ANSWER, "w") as f:
        json.dump(answer, f)
    if "error" in answer:
        return 2
    return None if what == "quiet" else 0  # None: as a main() that returns nothing
