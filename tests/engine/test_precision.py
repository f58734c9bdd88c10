"""The dtype the backbone runs in, and that what is measured is the float32 layer exported."""

from __future__ import annotations

import pydantic
import pytest
import torch

from core.job_config import JobConfig, ResolvedJobConfig
from core.settings import Settings
from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.architectures import build_model
from engine.data import (
    ImageDataset,
    eval_transform,
    open_image,
    scan_image_folder,
    stratified_split,
)
from engine.device import (
    autocast_dtype,
    cpu_has_bf16,
    float32_head,
    loss_scaling,
)
from engine.evaluate import confusion_matrix
from engine.expand import ExpansionConfig, expand_classifier
from engine.finetune import image_loader
from engine.gather import gather_images
from engine.heads import find_head
from engine.reference import backbone_fingerprint
from engine.train import HeadTraining
from engine.weights import load_classifier, save_safetensors
from tests.conftest import digits_request
from worker.spec import expansion_config

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device", "capability", "precision", "expected"),
    [
        # auto: bf16 where tensor cores do bf16 (Ampere, 8.0, and later) ...
        ("cuda", (8, 0), "auto", BF16),
        ("cuda", (8, 6), "auto", BF16),
        ("cuda", (9, 0), "auto", BF16),
        ("cuda", (10, 0), "auto", BF16),
        # ... fp16 below it, where bf16 is only emulated (is_bf16_supported() says True there)
        ("cuda", (7, 5), "auto", FP16),
        ("cuda", (7, 0), "auto", FP16),
        ("cuda", (6, 1), "auto", FP16),
        # a setting is taken as said
        ("cuda", (9, 0), "fp32", FP32),
        ("cuda", (7, 0), "fp32", FP32),
        ("cuda", (9, 0), "fp16", FP16),
        ("cuda", (7, 5), "bf16", BF16),
        ("cuda", (8, 0), "bf16", BF16),
        # a CPU runs float32 unless bf16 is asked for (and its matrix units take it)
        ("cpu", None, "auto", FP32),
        ("cpu", None, "bf16", FP32),
        ("cpu", None, "fp16", FP32),
        ("cpu", None, "fp32", FP32),
        ("mps", None, "auto", FP32),
    ],
)
def test_the_backbone_dtype_follows_the_capability_and_the_setting(
    device, capability, precision, expected
):
    assert autocast_dtype(device, capability, precision) == expected
    native = precision == "bf16" and device == "cpu"
    assert autocast_dtype(device, capability, precision, native_bf16=True) == (
        BF16 if native else expected
    )


def test_fp16_training_alone_scales_its_loss():
    assert loss_scaling("cuda", FP16)
    assert not loss_scaling("cuda", BF16)
    assert not loss_scaling("cuda", FP32)
    assert not loss_scaling("cpu", FP16)


def test_a_precision_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        autocast_dtype("cuda", (9, 0), "fp8")
    with pytest.raises(ValueError, match="capability"):
        autocast_dtype("cuda", None, "auto")


def test_graft_precision_and_batch_size_reach_the_engine(monkeypatch):
    config = ResolvedJobConfig.resolve(JobConfig(), has_old_images=True, gate={})
    default = expansion_config(config, Settings())
    assert (default.precision, default.batch_size) == ("auto", 64)
    assert default.precision == ExpansionConfig().precision
    assert default.batch_size == ExpansionConfig().batch_size

    monkeypatch.setenv("GRAFT_PRECISION", "fp32")
    monkeypatch.setenv("GRAFT_EXTRACT_BATCH_SIZE", "16")
    chosen = expansion_config(config, Settings())
    assert (chosen.precision, chosen.batch_size) == ("fp32", 16)

    monkeypatch.setenv("GRAFT_PRECISION", "fp8")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_the_classifier_layer_runs_in_float32_under_autocast():
    """The backbone in bf16, the layer in float32 on float32 features: the logits are the
    float32 layer's on what the backbone gave it (CPU autocast stands in for a GPU's)."""
    torch.manual_seed(0)
    model = build_model(ARCH, 10)
    head = find_head(model)
    seen = {}
    head.module.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        plain = model(x)
        with float32_head(model, head):
            logits = model(x)
    assert plain.dtype == BF16  # what autocast alone gives: a bf16 layer on bf16 features
    assert logits.dtype == FP32 and seen["x"].dtype == FP32
    with torch.inference_mode():
        torch.testing.assert_close(logits, head.module(seen["x"]), rtol=0, atol=0)
    assert find_head(model).module is head.module  # the model is itself again
    assert set(model.state_dict()) == set(build_model(ARCH, 10).state_dict())


def test_features_of_an_autocast_backbone_are_cached_apart_from_float32_ones():
    model = build_model(ARCH, 9)
    head = find_head(model)
    fp32 = backbone_fingerprint(model, head, D.PREP)
    assert backbone_fingerprint(model, head, D.PREP, FP32) == fp32  # caches so far stay valid
    bf16 = backbone_fingerprint(model, head, D.PREP, BF16)
    fp16 = backbone_fingerprint(model, head, D.PREP, FP16)
    assert len({fp32, bf16, fp16}) == 3


def test_loaders_use_workers_and_pinned_memory_on_a_gpu_only(tmp_path, digit_splits):
    root = D.write_image_folder(tmp_path, {"0": digit_splits[1].of(0)[:2]})
    dataset = ImageDataset(scan_image_folder(root), D.PREP, eval_transform(D.PREP))
    gpu = image_loader(dataset, 8, torch.device("cuda"), 2, passes=3)
    assert (gpu.num_workers, gpu.pin_memory, gpu.persistent_workers) == (2, True, True)
    once = image_loader(dataset, 8, torch.device("cuda"), 2)
    assert (once.num_workers, once.persistent_workers) == (2, False)
    cpu = image_loader(dataset, 8, torch.device("cpu"), 2, passes=3)
    assert (cpu.num_workers, cpu.pin_memory, cpu.persistent_workers) == (0, False, False)


def test_reported_metrics_are_those_of_the_exported_float32_model(
    tmp_path, digit_splits, base_weights
):
    """A fine-tuned job's held-out figures are what the downloaded file predicts, in float32."""
    _, held = digit_splits
    folders = {str(d): held.of(d)[:8] for d in OLD} | {"9": held.of(9)[:8]}
    root = D.write_image_folder(tmp_path / "images", folders)
    training = HeadTraining(epochs=1, learning_rate=1e-3, batch_size=16)
    config = ExpansionConfig(freeze="last_block", training=training, device="cpu")
    request = digits_request(base_weights, root, config)
    result = expand_classifier(request)
    m = result.metrics
    assert m["device"] == "cpu" and m["precision"] == "fp32"
    assert m["batch_size"] == {"extract": 64, "finetune": 16, "evaluate": 64}

    path = tmp_path / "v2.safetensors"
    save_safetensors(path, result.model, {})
    exported, _ = load_classifier(ARCH, 10, path)
    images = gather_images(request.samples, result.labels, 9, [], lambda _: [], {}, 512)
    _, val = stratified_split(images.targets.tolist(), config.validation_split, 0)
    transform = eval_transform(D.PREP)
    x = torch.stack([transform(open_image(images.samples[i].path, D.PREP)) for i in val])
    with torch.inference_mode():
        logits = exported.float()(x)
    assert logits.dtype == FP32
    matrix = confusion_matrix(images.targets[val], logits.argmax(1), len(result.labels))
    assert m["confusion_matrix"]["matrix"] == matrix.tolist()
    assert sum(map(sum, matrix.tolist())) == len(val) == m["overall"]["n"]


def test_cached_features_are_float32_and_give_the_exported_layer_s_logits(
    tmp_path, digit_splits, base_weights
):
    """The features a job keeps (and the next job's layer is fitted and calibrated on) are
    float32 and are what the exported model's own classifier layer sees."""
    _, held = digit_splits
    folders = {str(d): held.of(d)[:6] for d in OLD} | {"9": held.of(9)[:6]}
    root = D.write_image_folder(tmp_path / "images", folders)
    result = expand_classifier(digits_request(base_weights, root, ExpansionConfig(device="cpu")))
    assert result.metrics["precision"] == "fp32"
    samples = {s.path: s for s in scan_image_folder(root)}
    kept = [k for k in result.reference if k.path in samples][:12]
    features = torch.stack([result.features[k.digest] for k in kept])
    assert features.dtype == FP32
    transform = eval_transform(D.PREP)
    x = torch.stack([transform(open_image(k.path, D.PREP)) for k in kept])
    layer = find_head(result.model).module
    with torch.inference_mode():
        torch.testing.assert_close(layer(features), result.model(x), rtol=1e-4, atol=1e-4)


def test_one_thread_gives_the_thread_count_back_even_after_an_error():
    from engine.device import one_thread
    from engine.refit import whitening_factor

    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), one_thread():
        raise RuntimeError("a failing step")
    assert torch.get_num_threads() == before
    matrix = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    factor = whitening_factor(matrix)  # in one thread, then the count given back
    assert torch.equal(factor, factor.tril())
    assert torch.allclose(factor @ factor.T, matrix, atol=1e-6)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with AMX or AVX512-BF16")
def test_a_cpu_job_asked_for_bf16_runs_its_backbone_in_it(tmp_path, digit_splits, base_weights):
    """GRAFT_PRECISION=bf16 on a CPU whose matrix units take bf16: the backbone runs in bf16,
    its features are cached apart from float32's and differ from them, and the job's
    figures are the float32 job's up to the backbone's rounding on a few borderline images."""
    _, held = digit_splits
    folders = {str(d): held.of(d)[:10] for d in OLD} | {"9": held.of(9)[:10]}
    root = D.write_image_folder(tmp_path / "images", folders)
    jobs = {
        precision: expand_classifier(
            digits_request(base_weights, root, ExpansionConfig(device="cpu", precision=precision))
        )
        for precision in ("auto", "bf16")
    }
    fp32, bf16 = jobs["auto"], jobs["bf16"]
    assert (fp32.metrics["precision"], bf16.metrics["precision"]) == ("fp32", "bf16")
    assert bf16.fingerprint != fp32.fingerprint
    features = torch.stack(list(bf16.features.values()))
    assert not torch.equal(features, torch.stack([fp32.features[d] for d in bf16.features]))
    matrices = [torch.tensor(j.metrics["confusion_matrix"]["matrix"]) for j in (fp32, bf16)]
    n = int(matrices[0].sum())
    assert int(matrices[1].sum()) == n
    assert (matrices[0] - matrices[1]).abs().sum().item() <= 2 * max(2, n // 25)
