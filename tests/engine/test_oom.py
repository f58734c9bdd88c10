"""A step that runs out of GPU memory is tried once more at half its batch size, then the job
fails as ``out_of_memory`` naming the setting to lower.

The GPU is played by a real model that raises ``torch.OutOfMemoryError`` (what CUDA raises) on
batches larger than it can take, from a forward hook: the engine's real extraction, fine-tuning
and evaluation code paths run on the CPU around it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from devkit import digits as D
from devkit.digits import OLD, digits_archive
from engine import expand
from engine.errors import OutOfMemory, resource_error
from engine.expand import ExpansionConfig, expand_classifier
from engine.train import HeadTraining
from engine.weights import load_classifier, read_state_dict
from tests.conftest import digits_request
from worker import pipeline

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"


class SmallGPU:
    """Makes the models the engine loads raise out of memory on the batches ``too_big`` says
    are too big, given the batch size, whether gradients are on and how many batches of that
    kind went through before; records every batch."""

    def __init__(self, too_big: Callable[[int, bool, int], bool]) -> None:
        self.too_big = too_big
        self.batches: list[tuple[int, bool]] = []

    def load(self, *args, **kwargs):
        model, head = load_classifier(*args, **kwargs)

        def check(_module, inputs):
            size, training = inputs[0].shape[0], torch.is_grad_enabled()
            before = len(self.sizes(training))
            self.batches.append((size, training))
            if self.too_big(size, training, before):
                raise torch.OutOfMemoryError(OOM)

        model.register_forward_pre_hook(check)
        return model, head

    def sizes(self, training: bool) -> list[int]:
        return [size for size, grad in self.batches if grad == training]


@pytest.fixture()
def small_gpu(monkeypatch) -> Callable[[Callable[[int, bool, int], bool]], SmallGPU]:
    def install(too_big: Callable[[int, bool, int], bool]) -> SmallGPU:
        gpu = SmallGPU(too_big)
        monkeypatch.setattr(expand, "load_classifier", gpu.load)
        return gpu

    return install


@pytest.fixture()
def images(tmp_path, digit_splits):
    _, held = digit_splits
    folders = {str(d): held.of(d)[:8] for d in OLD} | {"9": held.of(9)[:8]}
    return D.write_image_folder(tmp_path / "images", folders)


def on_cpu(**options) -> ExpansionConfig:
    """On the CPU even where a GPU is, so that runs compare exactly."""
    return ExpansionConfig(device="cpu", **options)


def finetuning(batch_size: int) -> ExpansionConfig:
    training = HeadTraining(epochs=1, learning_rate=1e-3, batch_size=batch_size)
    return on_cpu(freeze="last_block", training=training, batch_size=16)


def test_extraction_out_of_memory_succeeds_at_half_the_batch(small_gpu, images, base_weights):
    gpu = small_gpu(lambda size, _, __: size > 16)
    stages = []
    request = digits_request(base_weights, images, on_cpu(batch_size=32))
    result = expand_classifier(request, progress=stages.append)

    assert result.metrics["batch_size"] == {"extract": 16}
    assert gpu.sizes(training=False)[0] == 32  # tried first, then every batch at 16
    assert max(gpu.sizes(training=False)[1:]) == 16
    retried = "out of GPU memory extracting features at batch size 32; trying 16"
    assert retried in [s.message for s in stages if s.stage == "extracting"]
    # the same job as one run at 16 from the start: the same layer, the same memory budget
    at_16 = expand_classifier(digits_request(base_weights, images, on_cpu(batch_size=16)))
    assert result.metrics["feature_cache"] == at_16.metrics["feature_cache"]
    assert result.metrics["old_classes"] == at_16.metrics["old_classes"]
    for key, value in at_16.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value)


def test_finetuning_out_of_memory_starts_again_from_the_warm_model_at_half_the_batch(
    small_gpu, images, base_weights
):
    # two steps at 16 go through, the third batch does not fit
    gpu = small_gpu(lambda size, training, before: training and size > 8 and before >= 2)
    result = expand_classifier(digits_request(base_weights, images, finetuning(16)))

    assert result.metrics["batch_size"] == {"extract": 16, "finetune": 8, "evaluate": 16}
    assert gpu.sizes(training=True)[:3] == [16, 16, 16]
    assert max(gpu.sizes(training=True)[3:]) == 8
    base = read_state_dict(base_weights)
    assert torch.equal(result.model.state_dict()["fc.weight"][:9], base["fc.weight"])
    # the failed attempt's steps are undone: as if fine-tuned at 8 from the start
    small_gpu(lambda size, training, before: False)
    at_8 = expand_classifier(digits_request(base_weights, images, finetuning(8)))
    for key, value in at_8.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value)
    assert result.metrics["history"][-1] == at_8.metrics["history"][-1]


def test_extraction_that_never_fits_fails_as_out_of_memory_naming_the_setting(
    small_gpu, images, base_weights
):
    gpu = small_gpu(lambda size, _, __: True)
    with pytest.raises(OutOfMemory) as failed:
        expand_classifier(digits_request(base_weights, images, on_cpu(batch_size=32)))
    assert failed.value.code == "out_of_memory"
    message = str(failed.value)
    assert "GRAFT_EXTRACT_BATCH_SIZE (now 32)" in message
    assert "at batch size 32 and again at 16" in message
    assert gpu.sizes(training=False) == [32, 16]  # two tries, no more


def test_finetuning_that_never_fits_fails_naming_the_job_s_batch_size(
    small_gpu, images, base_weights
):
    gpu = small_gpu(lambda size, training, _: training)
    with pytest.raises(OutOfMemory) as failed:
        expand_classifier(digits_request(base_weights, images, finetuning(16)))
    message = str(failed.value)
    assert "fine-tuning at batch size 16 and again at 8" in message
    assert "the job's batch_size (now 16)" in message
    assert gpu.sizes(training=True) == [16, 8]


def test_a_batch_of_one_is_not_halved(small_gpu, images, base_weights):
    gpu = small_gpu(lambda size, _, __: True)
    with pytest.raises(OutOfMemory, match="at batch size 1 \\("):
        expand_classifier(digits_request(base_weights, images, on_cpu(batch_size=1)))
    assert gpu.sizes(training=False) == [1]


def test_gpu_out_of_memory_anywhere_else_names_the_gpu_settings():
    error = resource_error(torch.OutOfMemoryError(OOM))
    assert error is not None and error.code == "out_of_memory"
    assert "GPU" in str(error) and "GRAFT_EXTRACT_BATCH_SIZE" in str(error)


def test_a_job_that_never_fits_fails_with_code_out_of_memory(
    small_gpu, settings, client, model, digit_splits
):
    """Through the worker: the job's error says what happened and which setting to lower."""
    small_gpu(lambda size, _, __: size > 4)
    archive = digits_archive(digit_splits[1], old_per_class=4, new_shots=4)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()

    worker = settings.model_copy(update={"extract_batch_size": 16, "device": "cpu"})
    pipeline.run_job(job["id"], worker)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "out_of_memory"
    assert "GRAFT_EXTRACT_BATCH_SIZE (now 16)" in job["error"]["message"]
