"""``python -m worker.engine.unpickle SRC DST``: a torch state dict to safetensors.

Run by :func:`worker.engine.weights.convert_to_safetensors` in a process of its own, with
memory and time limits. Exit code 2 and the reason on the last line of stderr when refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import safetensors.torch

from worker.engine.errors import WeightsError
from worker.engine.weights import load_pickled_state_dict


def main(source: str, target: str) -> int:
    try:
        state = load_pickled_state_dict(Path(source))
    except WeightsError as exc:
        print(f"WeightsError: {exc}", file=sys.stderr)
        return 2
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
