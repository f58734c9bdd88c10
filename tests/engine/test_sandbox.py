"""The sandbox every uploaded model is opened in: a child forked from a zygote that has
imported the engine, with the server's secrets out of reach, killed with everything it started
when it runs too long, answering for itself when it crashes or refuses."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from engine import sandbox

STEP = "tests.support.sandbox_steps"


def run(folder, what: str, **limits):
    folder.mkdir(exist_ok=True)
    return sandbox.run(STEP, folder, [what], sandbox.Limits(**limits), "the step")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead
    except FileNotFoundError:  # reaped meanwhile
        return False


def test_a_step_sees_none_of_the_servers_environment(tmp_path, monkeypatch):
    sandbox.stop()  # the zygote takes its environment when it starts
    monkeypatch.setenv("GRAFT_S3_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token")
    answer = run(tmp_path / "a", "environment")
    assert not [k for k in answer["environment"] if k.startswith(("GRAFT_", "AWS_"))]
    assert "OMP_NUM_THREADS" in answer["environment"]
    assert answer["cwd"] == str((tmp_path / "a").resolve())


def test_a_step_past_its_wall_clock_is_killed_with_what_it_started(tmp_path):
    folder = tmp_path / "slow"
    with pytest.raises(sandbox.OverLimit, match="longer than 2 s"):
        run(folder, "linger", wall_s=2)
    grandchild = int((folder / "grandchild").read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_step_past_its_file_size_limit_is_stopped_and_says_so(tmp_path):
    with pytest.raises(sandbox.OverLimit, match="a file larger than"):
        run(tmp_path / "big", "big", file_bytes=1 << 20)
    assert run(tmp_path / "quiet", "quiet")["echo"] == "quiet"  # main() returning None: done


def test_a_crash_and_a_refusal_are_answered_as_such(tmp_path):
    with pytest.raises(sandbox.OverLimit, match="crashed .SIGABRT: the step gives up"):
        run(tmp_path / "crash", "crash")
    with pytest.raises(sandbox.Refused, match="not this one") as refused:
        run(tmp_path / "refuse", "refuse")
    assert refused.value.field == "labels"


def test_steps_run_side_by_side_and_a_killed_zygote_comes_back(tmp_path):
    answers: dict[int, dict] = {}

    def one(i: int) -> None:
        answers[i] = run(tmp_path / str(i), f"step {i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert {i: a["echo"] for i, a in answers.items()} == {i: f"step {i}" for i in range(6)}
    assert len({a["pid"] for a in answers.values()}) == 6  # a child each

    zygote = sandbox._ZYGOTE._process
    assert zygote is not None
    os.kill(zygote.pid, signal.SIGKILL)
    zygote.wait()
    assert run(tmp_path / "again", "again")["echo"] == "again"
    folder = sandbox._ZYGOTE._folder
    (folder / "socket").unlink()  # a cleaner of /tmp took its socket: a new zygote
    assert run(tmp_path / "anew", "anew")["echo"] == "anew"


SYSTEM_PYTHON = "/usr/bin/python3"  # one that another user may run (the venv's may be private)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to run both sides as another user) and a system Python",
)
@pytest.mark.parametrize("hidden", [False, True])
def test_a_process_of_the_same_user_cannot_read_a_hidden_servers_environment(hidden):
    """What a model's code in a child would try: read the server's credentials in /proc."""
    import inspect
    import subprocess

    nobody = 65534
    # the function's own source, run by a Python the other user may start (the repository
    # may sit in a folder only root can read)
    script = (
        "import contextlib, sys, time\n"
        + inspect.getsource(sandbox.hide_environment)
        + "if sys.argv[1] == 'hide': hide_environment()\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    server = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", script, "hide" if hidden else "show"],
        env={"GRAFT_S3_SECRET_ACCESS_KEY": "hunter2"},
        user=nobody, stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "ready"
        reader = subprocess.run(
            [SYSTEM_PYTHON, "-c", f"print(open('/proc/{server.pid}/environ', 'rb').read())"],
            user=nobody, capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
    finally:
        server.kill()
        server.wait()
    assert ("hunter2" in reader.stdout) is not hidden, reader.stdout + reader.stderr
