"""What writing ONNX and TorchScript at registration adds to POST /v1/models, and what the
bounded process that opens every upload costs.

Registers a resnet18 (9 labels, random weights: the time does not depend on their values)
through the real app (SQLite, a local artifact folder) at each input size, with every format
and with safetensors only, alternating, and prints the median of each and their difference.
Then the sandbox's fixed cost: a sandboxed step that does nothing, forked from the zygote,
against a fresh interpreter importing what the intake imports (what each registration paid
before the zygote); medians of the repeats.
`.venv/bin/python bench/registration.py [--sizes 32 224] [--repeats 3]`
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import sandbox, zygote  # noqa: E402

LABELS = [str(d) for d in range(9)]


def register(client, name: str, architecture: str, size: int, weights: Path) -> float:
    """Seconds one POST /v1/models takes, with the formats ``app.registration.EXPORTS`` names."""
    prep = {"input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3}
    data = {
        "name": name,
        "architecture": architecture,
        "labels": json.dumps(LABELS),
        "preprocessing": json.dumps(prep),
    }
    start = time.perf_counter()
    with weights.open("rb") as f:
        response = client.post("/v1/models", data=data, files={"weights": ("w.safetensors", f)})
    seconds = time.perf_counter() - start
    assert response.status_code == 201, response.text
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--architecture", default="timm:resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import safetensors.torch
    from fastapi.testclient import TestClient

    from app import registration
    from app.main import create_app
    from core.migrate import db_upgrade
    from core.settings import Settings
    from engine.architectures import build_model

    exports = registration.EXPORTS
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.safetensors"
        model = build_model(args.architecture, len(LABELS))
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(weights)
        )
        settings = Settings(data_dir=Path(tmp) / "var", sweep_interval_s=0)
        db_upgrade(settings)
        mib = weights.stat().st_size >> 20
        print(f"## registration: {args.architecture}, {mib} MiB of weights")
        print(
            f"{'size':>5} {'safetensors (s)':>16} {'+ onnx, torchscript (s)':>24} {'added (s)':>10}"
        )
        with TestClient(create_app(settings)) as client:
            names = (f"m{i}" for i in itertools.count())
            for size in args.sizes:
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.repeats):
                    for every_format in (False, True):
                        registration.EXPORTS = exports if every_format else ()
                        seconds = register(client, next(names), args.architecture, size, weights)
                        times[every_format].append(seconds)
                registration.EXPORTS = exports
                base, full = (statistics.median(times[k]) for k in (False, True))
                print(f"{size:>5} {base:>16.2f} {full:>24.2f} {full - base:>10.2f}")
        fresh = [fresh_start(Path(tmp)) for _ in range(args.repeats)]
        start_up(Path(tmp))  # the zygote's own start, paid once per server
        forked = [start_up(Path(tmp)) for _ in range(args.repeats)]
        a, b = statistics.median(fresh), statistics.median(forked)
        print(f"a fresh interpreter importing the intake's modules: {a:.2f} s")
        print(f"a sandboxed step forked from the zygote:            {b:.2f} s ({a / b:.0f}x less)")


def fresh_start(folder: Path) -> float:
    """Seconds a new interpreter takes to import what the intake imports (the cost of a
    sandbox without a zygote)."""
    start = time.perf_counter()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": root}
    code = "import " + ", ".join(zygote.PRELOAD)
    subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, check=True)
    return time.perf_counter() - start


def start_up(folder: Path) -> float:
    """Seconds a sandboxed step that does nothing takes, from request to answer."""
    start = time.perf_counter()
    sandbox.run("bench.sandbox_start", folder, [], sandbox.Limits(), "starting")
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
