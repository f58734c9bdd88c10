"""Thin Celery tasks: receive an id, delegate to the pipeline."""

from __future__ import annotations

from celery import shared_task

from app.settings import get_settings
from worker.celery_app import RUN_JOB_TASK
from worker.pipeline import run_job


@shared_task(name=RUN_JOB_TASK, ignore_result=True)
def run_job_task(job_id: str) -> None:
    run_job(job_id, get_settings())
