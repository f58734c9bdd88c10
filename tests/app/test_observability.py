"""What operators see: JSON log lines that carry the job id, and job metrics in /metrics."""

from __future__ import annotations

import json
import logging

from core.logs import configure_logging
from devkit.digits import digits_archive
from worker import pipeline


def test_logs_and_metrics_of_a_job(client, settings, model, digit_splits, capsys):
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=6)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()
    configure_logging("INFO", "json")
    try:
        pipeline.run_job(job["id"], settings)
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    about_the_job = [line for line in lines if line.get("job_id") == job["id"]]
    assert any("succeeded" in line["message"] for line in about_the_job)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)

    metrics = client.get("/metrics").text
    assert 'graft_jobs{status="succeeded"} 1.0' in metrics
    assert "graft_queue_depth 0.0" in metrics
    assert 'graft_job_duration_seconds_bucket{le="+Inf"} 1.0' in metrics
    rate = next(
        line for line in metrics.splitlines() if line.startswith("graft_images_per_second ")
    )
    assert float(rate.split()[1]) > 0
    latency = 'graft_http_request_duration_seconds_count{method="POST",route="/v1/jobs"} 1.0'
    assert latency in metrics


def test_transformers_chatter_stays_out_of_the_log_unless_at_debug():
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from core.logs import configure_logging\n"
        "configure_logging(sys.argv[1], 'text')\n"
        "import transformers\n"
        "log = transformers.logging.get_logger('transformers.modeling_utils')\n"
        "log.warning('loss_type=None was set in the config')\n"
    )
    for level, shown in (("INFO", False), ("DEBUG", True)):
        env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
        done = subprocess.run(
            [sys.executable, "-c", script, level],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,  # as a server starts: the variable is Graft's to set, not inherited
        )
        assert done.returncode == 0, done.stderr
        assert ("loss_type=None" in done.stdout + done.stderr) is shown, level
