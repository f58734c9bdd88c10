"""Out of memory and out of disk are named as such, with what to change, wherever they surface."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

from engine.errors import DiskFull, OutOfMemory, resource_error


def test_a_write_to_a_full_disk_is_disk_full():
    with pytest.raises(OSError) as caught, open("/dev/full", "wb") as full:
        full.write(b"x" * 65536)
        full.flush()
    error = resource_error(caught.value)
    assert isinstance(error, DiskFull) and error.code == "disk_full"
    assert "GRAFT_DATA_DIR" in str(error)


def test_an_allocation_that_fails_is_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**62, dtype=torch.uint8)
    error = resource_error(caught.value)
    assert isinstance(error, OutOfMemory) and error.code == "out_of_memory"
    assert "GRAFT_FEATURE_MEMORY_MB" in str(error)


def test_a_wrapped_failure_is_found_through_its_cause():
    try:
        try:
            raise MemoryError()
        except MemoryError as inner:
            raise ValueError("could not build the batch") from inner
    except ValueError as outer:
        assert isinstance(resource_error(outer), OutOfMemory)
    assert resource_error(ValueError("bad label")) is None


@pytest.mark.fault("a worker cannot start a thread (its address space or process limit)")
def test_a_thread_that_cannot_start_is_out_of_memory(observed):
    """As when s3transfer's pool starts its threads in a worker whose address space is capped."""
    script = textwrap.dedent(
        """
        import resource, threading, time
        from engine.errors import resource_error
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 64 * 2**20, resource.RLIM_INFINITY))
        try:
            for _ in range(1000):  # each thread maps its stack (8 MiB)
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            print("started them all")
        except RuntimeError as exc:
            error = resource_error(exc)
            print(error.code if error else "unnamed", "|", error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    code, _, message = done.stdout.partition(" | ")
    assert code == "out_of_memory", done.stdout + done.stderr
    assert "could not start a thread" in message and "ulimit" in message
    observed(f"threads started under a 64 MiB address-space margin: {code}")


def test_weights_that_cannot_be_mapped_for_lack_of_memory_are_not_invalid_weights(tmp_path):
    """The weights file is fine; the process may not map it (its address space is capped)."""
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(64 * 1024 * 1024, dtype=torch.uint8)}, str(path))
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from engine.errors import EngineError
        from engine.weights import tensor_layout
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 16 * 2**20, resource.RLIM_INFINITY))
        try:
            tensor_layout(Path({str(path)!r}))
            print("loaded")
        except EngineError as exc:
            print(exc.code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "out_of_memory", done.stdout + done.stderr
