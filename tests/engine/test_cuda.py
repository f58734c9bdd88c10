"""The engine on a real GPU (skipped without one; bench/gpu.sh runs them on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

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
from engine.decoded import DecodedCache
from engine.device import autocast_for, compute_dtype, precision_name
from engine.device_decode import DeviceBatches, plan
from engine.errors import JobCancelled
from engine.evaluate import confusion_matrix
from engine.expand import ExpansionConfig, Progress, expand_classifier
from engine.features import extract_features
from engine.gather import gather_images
from engine.heads import find_head
from engine.train import HeadTraining
from engine.weights import load_classifier, read_state_dict
from tests.conftest import digits_request
from tests.engine.test_device_decode import NVJPEG_COSINE
from tests.support.photos import write_photos

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(150),
]

MiB = 2**20


@pytest.fixture(scope="module")
def images(tmp_path_factory, digit_splits):
    _, held = digit_splits
    folders = {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:20]}
    return D.write_image_folder(tmp_path_factory.mktemp("cuda-images"), folders)


def finetuning(precision: str = "auto", batch_size: int = 32) -> ExpansionConfig:
    training = HeadTraining(epochs=2, learning_rate=1e-3, batch_size=batch_size)
    return ExpansionConfig(
        freeze="last_block", training=training, device="cuda", precision=precision
    )


def expected_dtype() -> torch.dtype:
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def test_the_dtype_chosen_is_the_one_the_gpu_runs():
    device = torch.device("cuda")
    dtype = compute_dtype(device)
    assert dtype == expected_dtype()
    conv = build_model(ARCH, 9).to(device).eval().conv1
    with torch.inference_mode(), autocast_for(device, dtype):
        out = conv(torch.randn(2, 3, 32, 32, device=device))
    assert out.dtype == dtype
    assert compute_dtype(device, "fp32") == torch.float32


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_a_fine_tuning_job_runs_on_the_gpu_in_its_precision(
    precision, images, base_weights, digit_splits
):
    request = digits_request(base_weights, images, finetuning(precision))
    result = expand_classifier(request)
    m = result.metrics
    dtype = {"auto": expected_dtype(), "fp16": torch.float16, "fp32": torch.float32}[precision]
    assert m["device"].startswith("cuda") and m["precision"] == precision_name(dtype)
    assert m["method"] == "imprint+refit+finetune:last_block"
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in m["history"])
    # a normal job is never halved
    assert m["batch_size"] == {"extract": 64, "finetune": 32, "evaluate": 64}
    assert m["gpu_peak_memory_mb"] > 0

    state = result.model.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    base = read_state_dict(base_weights)
    assert torch.equal(state["fc.weight"][:9], base["fc.weight"])  # old rows bit-identical
    backbone = {k: v for k, v in base.items() if not k.startswith("fc.")}
    changed = [k for k, v in backbone.items() if not torch.equal(state[k], v)]
    assert changed and all(k.startswith("layer4.1.") for k in changed)  # the last block only

    assert_reported_is_exported(request, result)


def assert_reported_is_exported(request, result) -> None:
    """What was reported is what the exported float32 file predicts (on the CPU, its images
    decoded by PIL), up to the backbone's rounding on a few borderline images."""
    m = result.metrics
    images_ = gather_images(request.samples, result.labels, 9, [], lambda _: [], {}, 512)
    _, val = stratified_split(images_.targets.tolist(), 0.2, 0)
    transform = eval_transform(D.PREP)
    x = torch.stack([transform(open_image(images_.samples[i].path, D.PREP)) for i in val])
    with torch.inference_mode():
        predicted = result.model(x).argmax(1)
    matrix = torch.tensor(m["confusion_matrix"]["matrix"])
    exported = confusion_matrix(images_.targets[val], predicted, len(result.labels))
    assert (matrix - exported).abs().sum().item() <= max(2, len(val) // 25)


def test_a_head_job_on_the_gpu_caches_float32_features(images, base_weights):
    config = ExpansionConfig(device="cuda")
    result = expand_classifier(digits_request(base_weights, images, config))
    assert result.metrics["precision"] == precision_name(expected_dtype())
    assert result.metrics["batch_size"] == {"extract": 64}
    features = next(iter(result.features.values()))
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    fp32 = expand_classifier(
        digits_request(base_weights, images, ExpansionConfig(device="cuda", precision="fp32"))
    )
    assert fp32.fingerprint != result.fingerprint  # rounded features are cached apart


def test_a_job_gives_back_the_gpu_memory_it_used(images, base_weights):
    config = finetuning()
    expand_classifier(digits_request(base_weights, images, config))  # one-time allocations
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    result = expand_classifier(digits_request(base_weights, images, config))
    torch.cuda.synchronize()
    assert result.metrics["gpu_peak_memory_mb"] * MiB > allocated + 16 * MiB  # it did use some
    assert torch.cuda.memory_allocated() <= allocated + MiB
    assert torch.cuda.memory_reserved() <= reserved + 16 * MiB


def test_a_cancelled_job_gives_back_the_gpu_memory_too(images, base_weights):
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    finetuning_started = []

    def progress(p: Progress) -> None:  # after the first epoch: model and teacher on the GPU
        if p.stage == "training" and p.message.startswith("last_block:"):
            finetuning_started.append(p)

    request = digits_request(base_weights, images, finetuning())
    with pytest.raises(JobCancelled):
        expand_classifier(request, progress, should_stop=lambda: bool(finetuning_started))
    torch.cuda.synchronize()
    assert finetuning_started
    assert torch.cuda.memory_allocated() <= allocated + MiB


def _digit_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digit scans as 64-d features; an old layer fitted on 0-8, a zero row for 9."""
    from sklearn.datasets import load_digits

    from engine.refit import Refit, refit_layer

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    old = y < 9
    w, b = refit_layer(x[old], y[old], torch.zeros(9, 64), torch.zeros(9), 0, Refit())
    return x, y, torch.cat([w, torch.zeros(1, 64)]), torch.cat([b, torch.zeros(1)])


@pytest.mark.parametrize("resident", [True, False])
def test_the_refit_on_the_gpu_agrees_with_the_cpu(monkeypatch, resident):
    from engine.refit import Refit, refit_layer

    x, y, weight, bias = _digit_features()
    cpu_w, cpu_b = refit_layer(x, y, weight, bias, 9, Refit())
    if not resident:  # features too large for the GPU: moved chunk by chunk on every pass
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (1024, 2**34))
    gpu_w, gpu_b = refit_layer(x, y, weight, bias, 9, Refit(), device="cuda")
    assert gpu_w.device.type == "cpu" and gpu_b.device.type == "cpu"
    cpu_pred = (x @ cpu_w.T + cpu_b).argmax(1)
    gpu_pred = (x @ gpu_w.T + gpu_b).argmax(1)
    assert float((cpu_pred == gpu_pred).float().mean()) >= 0.995
    assert float((gpu_w - cpu_w).norm() / cpu_w.norm()) < 0.05  # one convex optimum
    frozen_w, frozen_b = refit_layer(
        x, y, weight, bias, 9, Refit(), device="cuda", old_rows_frozen=True
    )
    assert torch.equal(frozen_w[:9], weight[:9]) and torch.equal(frozen_b[:9], bias[:9])


def test_an_evaluation_on_the_gpu_scores_as_the_cpu_does(images, base_weights, tmp_path):
    """Versions compared on the GPU (backbone under autocast, the layers in float32) give the
    CPU's figures, give or take an image on a borderline."""
    from engine.compare import CompareConfig, VersionFile, compare_versions
    from engine.data import scan_image_folder
    from engine.weights import save_safetensors

    grown = expand_classifier(digits_request(base_weights, images))
    path = tmp_path / "v2.safetensors"
    save_safetensors(path, grown.model, {})
    files = [
        VersionFile(1, ARCH, [str(d) for d in OLD], base_weights, D.PREP),
        VersionFile(2, ARCH, grown.labels, path, D.PREP),
    ]
    samples = scan_image_folder(images)
    compare_versions(files, samples, CompareConfig(device="cuda"))  # one-time allocations
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    on_gpu = compare_versions(files, samples, CompareConfig(device="cuda"))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated + MiB  # what it used is given back
    on_cpu = compare_versions(files, samples, CompareConfig(device="cpu"))
    assert on_gpu["device"].startswith("cuda") and on_gpu["backbone_passes"] == 1
    for gpu, cpu in zip(on_gpu["versions"], on_cpu["versions"], strict=True):
        assert gpu["overall"]["n"] == cpu["overall"]["n"]
        right_gpu = gpu["overall"]["accuracy"] * gpu["overall"]["n"]
        right_cpu = cpu["overall"]["accuracy"] * cpu["overall"]["n"]
        assert abs(right_gpu - right_cpu) <= 1


@pytest.fixture(scope="module")
def jpeg_images(images, tmp_path_factory):
    """The digits, as JPEG files."""
    root = tmp_path_factory.mktemp("cuda-jpegs")
    for png in images.rglob("*.png"):
        (root / png.parent.name).mkdir(exist_ok=True)
        Image.open(png).convert("RGB").save(root / png.parent.name / f"{png.stem}.jpg", quality=95)
    return root


@pytest.mark.parametrize("size", [(48, 36), (192, 144)])
def test_jpeg_photos_decoded_by_nvjpeg_give_the_loaders_features(tmp_path, base_weights, size):
    samples = write_photos(tmp_path, 50, size)
    model, head = load_classifier(ARCH, len(OLD), base_weights)
    cuda, fp32 = torch.device("cuda"), torch.float32
    loader = DataLoader(ImageDataset(samples, D.PREP, eval_transform(D.PREP)), batch_size=16)
    loaders, _ = extract_features(model, head, loader, cuda, dtype=fp32)
    batches = DeviceBatches(samples, D.PREP, cuda, 16)
    assert plan("auto", cuda, D.PREP).jpeg_on_device and batches.jpeg_on_device
    on_gpu, order = extract_features(model, head, batches, cuda, dtype=fp32)
    assert order.tolist() == list(range(50))
    assert batches.decoded == {"device": 30, "cpu": 20}  # CMYK and PNG: on the CPU threads
    cosine = F.cosine_similarity(on_gpu, loaders)
    print(f"{size}: least cosine {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() >= NVJPEG_COSINE


def test_a_head_job_on_jpegs_decodes_them_on_the_gpu_with_the_exported_files_predictions(
    jpeg_images, base_weights, tmp_path
):
    decoded = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    config = ExpansionConfig(device="cuda", precision="fp32", decoded=decoded)
    request = digits_request(base_weights, jpeg_images, config)
    result = expand_classifier(request)
    decoding = result.metrics["decoding"]
    assert decoding["where"] == "device" and decoding["decoder"] == "decode_jpeg:cuda"
    kept = result.metrics["decoded_cache"]
    assert kept["state"] == "stored"
    assert decoding["images"] == {"device": kept["images"]}  # every distinct image, once

    # the job's layer on its features (nvJPEG's pixels, what its figures rest on) predicts
    # what the exported float32 file predicts on the CPU from PIL's pixels, up to the
    # decoders' rounding on a few borderline images
    samples = {s.path: s for s in scan_image_folder(jpeg_images)}
    images = [k for k in result.reference if k.path in samples]
    features = torch.stack([result.features[k.digest] for k in images])
    transform = eval_transform(D.PREP)
    x = torch.stack([transform(open_image(k.path, D.PREP)) for k in images])
    with torch.inference_mode():
        on_gpu = find_head(result.model).module(features).argmax(1)
        exported = result.model.float()(x).argmax(1)
    assert (on_gpu != exported).sum().item() <= max(2, len(images) // 25)

    again = expand_classifier(digits_request(base_weights, jpeg_images, config))
    assert again.metrics["decoded_cache"]["state"] == "hit"
    assert again.metrics["decoding"]["images"] == {"stored": kept["images"]}
