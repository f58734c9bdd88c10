"""A dataset registered by reference at scale: 100,000 small images in S3, imported, then trained.

A moto S3 server on loopback (in this process) is filled with 28x28 PNG scans of
scikit-learn's digits (each with a small random shift and contrast, a few hundred bytes),
``digits/<digit>/<n>.png``. Graft is started as a user starts it (`graft db upgrade`, then
`graft api` and `graft worker` as processes configured by GRAFT_* variables, with
GRAFT_IMPORT_BUCKETS naming the bucket); a base model of digits 0-8 is trained here and
registered; the images are registered by reference (a manifest of `uri,label` lines by
default, or `--mode prefix`: the folder itself), and a head-mode job teaches the model "9"
from the imported dataset.

Prints the time of each phase (filling the bucket is not counted), the import rate, the API's
CPU time during the import, and the peak memory (VmHWM) of the API and the worker.
`.venv/bin/python bench/import_100k.py [--images 100000] [--mode manifest|prefix]
[--arch timm:resnet18] [--epochs 1] [--keep]`

moto serves one request at a time (about 200 GETs/s on a 2-core machine) and lists a bucket
in time proportional to everything in it for every page of 1,000 keys, so the import's rate
here is the emulator's; `--mode prefix` at 100,000 images spends most of its time listing.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.net import free_port  # noqa: E402

BUCKET = "bench-digits"
OLD = list(range(9))


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def digit_pngs(n: int, seed: int = 0) -> list[tuple[int, bytes]]:
    """``n`` (digit, PNG bytes): 28x28 scans, each shifted and scaled in contrast a little."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        j = i % len(raw.target)
        pixels = np.zeros((10, 10), dtype=np.float32)
        dx, dy = rng.randint(0, 2), rng.randint(0, 2)
        pixels[dy : dy + 8, dx : dx + 8] = raw.images[j] * (255 / 16) * rng.uniform(0.7, 1.0)
        image = Image.fromarray(pixels.astype(np.uint8), "L").resize((28, 28))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append((int(raw.target[j]), buffer.getvalue()))
    return out


def fill_bucket(endpoint: str, images: list[tuple[int, bytes]]) -> list[tuple[str, int]]:
    """Put the images in the bucket: straight into the in-process server's store where this
    moto allows it, else by PUTs on 32 threads. Returns (key, digit)."""
    import boto3

    keys = [(f"digits/{digit}/{i:06d}.png", digit) for i, (digit, _) in enumerate(images)]
    try:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for (key, _), (_, data) in zip(keys, images, strict=True):
            backend.put_object(BUCKET, key, data)
    except (ImportError, KeyError, AttributeError, TypeError):
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        with ThreadPoolExecutor(32) as pool:
            list(
                pool.map(
                    lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0][0], Body=kv[1][1]),
                    zip(keys, images, strict=True),
                )
            )
    return keys


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "graft.cli", *argv], env=env, stdout=out, stderr=out
        )


def wait_http(http: Any, path: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"graft exited:\n{log.read_text()[-3000:]}")
        try:
            if http.get(path).status_code == 200:
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.3)
    sys.exit(f"graft did not start:\n{log.read_text()[-3000:]}")


def register_model(http: Any, folder: Path, arch: str, epochs: int) -> float:
    import safetensors.torch

    from devkit import digits as D

    started = time.perf_counter()
    base, _ = D.load()
    model = D.train_base(base, OLD, arch, epochs=epochs)
    weights = folder / "base.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(weights)
    )
    data = {
        "name": "digits",
        "architecture": arch,
        "labels": json.dumps([str(d) for d in OLD]),
        "preprocessing": json.dumps(D.PREP.to_dict()),
    }
    with weights.open("rb") as f:
        answer = http.post("/v1/models", data=data, files={"weights": ("base.safetensors", f)})
    if answer.status_code != 201:
        sys.exit(f"registering the model: {answer.status_code} {answer.text}")
    return time.perf_counter() - started


def wait_for(http: Any, path: str, done: set[str], every_s: float = 0.5) -> dict:
    while True:
        body = http.get(path).json()
        if body["status"] in done:
            return body
        time.sleep(every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--mode", choices=["manifest", "prefix"], default="manifest")
    parser.add_argument("--arch", default="timm:resnet18")
    parser.add_argument("--base-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="of the job (head mode)")
    parser.add_argument("--threads", type=int, default=16, help="GRAFT_IMPORT_THREADS")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    scratch = Path(tempfile.mkdtemp(prefix="graft-import-bench-"))
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret")
    s3_port, port = free_port(), free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    processes: list[subprocess.Popen] = []
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        t = time.perf_counter()
        images = digit_pngs(args.images)
        sizes = [len(data) for _, data in images]
        keys = fill_bucket(endpoint, images)
        del images
        manifest = "uri,label\n" + "".join(f"s3://{BUCKET}/{k},{d}\n" for k, d in keys)
        s3.put_object(Bucket=BUCKET, Key="digits.csv", Body=manifest.encode())
        fill_s = time.perf_counter() - t
        print(
            f"bucket filled: {len(keys)} PNGs, {sum(sizes) / len(sizes):.0f} bytes on average, "
            f"in {fill_s:.0f} s (not counted)",
            flush=True,
        )

        env = {
            **os.environ,
            "GRAFT_DATA_DIR": str(scratch / "var"),
            "GRAFT_PORT": str(port),
            "GRAFT_IMPORT_BUCKETS": BUCKET,
            "GRAFT_IMPORT_THREADS": str(args.threads),
            "GRAFT_S3_ENDPOINT_URL": endpoint,
            "GRAFT_LOG_LEVEL": "WARNING",
        }
        subprocess.run([sys.executable, "-m", "graft.cli", "db", "upgrade"], env=env, check=True)
        api = start(["api"], env, scratch / "api.log")
        worker = start(["worker"], env, scratch / "worker.log")
        processes += [api, worker]
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        wait_http(http, "/healthz", api, scratch / "api.log")
        model_s = register_model(http, scratch, args.arch, args.base_epochs)
        print(f"base model ({args.arch}) trained and registered in {model_s:.0f} s", flush=True)

        body = (
            {"manifest": f"s3://{BUCKET}/digits.csv"}
            if args.mode == "manifest"
            else {"source": f"s3://{BUCKET}/digits/"}
        )
        cpu_before = cpu_seconds(api.pid)
        t = time.perf_counter()
        answer = http.post("/v1/datasets", json={**body, "name": "bench"})
        if answer.status_code != 202:
            sys.exit(f"registering the dataset: {answer.status_code} {answer.text}")
        accepted_s = time.perf_counter() - t
        dataset = wait_for(http, answer.headers["location"], {"ready", "failed"})
        import_s = time.perf_counter() - t
        import_cpu = cpu_seconds(api.pid) - cpu_before
        if dataset["status"] != "ready":
            sys.exit(f"the import failed: {dataset['error']}")
        print(f"imported in {import_s:.0f} s", flush=True)

        job = {
            "model": "digits",
            "dataset_id": dataset["id"],
            "config": {"epochs": args.epochs, "export": []},
        }
        t = time.perf_counter()
        answer = http.post("/v1/jobs", json=job)
        if answer.status_code != 202:
            sys.exit(f"submitting the job: {answer.status_code} {answer.text}")
        finished = wait_for(
            http, f"/v1/jobs/{answer.json()['id']}", {"succeeded", "failed", "cancelled"}, 1.0
        )
        job_s = time.perf_counter() - t
        api_mb, worker_mb = peak_rss_mb(api.pid), peak_rss_mb(worker.pid)
        timing = (finished.get("metrics") or {}).get("timing", {})
        new = (finished.get("metrics") or {}).get("new_classes", {})
        old = (finished.get("metrics") or {}).get("old_classes", {})

        print()
        print(f"| phase | {args.images:,} images, {args.mode} |")
        print("|---|---|")
        print(f"| register (POST → 202) | {accepted_s * 1000:.0f} ms |")
        print(
            f"| import (POST → ready) | {import_s:.0f} s, {dataset['num_images'] / import_s:.0f} "
            f"images/s; API CPU {import_cpu:.0f} s ({import_cpu / import_s:.0%} of a core) |"
        )
        print(
            f"| dataset | {dataset['num_images']:,} images, {len(dataset['labels'])} labels, "
            f"{len(dataset['rejected'])} rejected |"
        )
        print(
            f"| job (submit → {finished['status']}) | {job_s:.0f} s (extract "
            f"{timing.get('extract_s', 0):.0f} s, train {timing.get('train_s', 0):.0f} s); "
            f"new-label accuracy {new.get('accuracy', float('nan')):.3f}, old-label "
            f"retention {old.get('retention', float('nan')):.3f} |"
        )
        print(f"| peak RSS (VmHWM), API | {api_mb:.0f} MiB |")
        print(f"| peak RSS (VmHWM), worker | {worker_mb:.0f} MiB |")
        if finished["status"] != "succeeded":
            print(f"\nthe job did not succeed: {finished.get('error')}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        moto.stop()
        if args.keep:
            print(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
