"""Clean views made on the device (engine/device_decode.py). On a CPU the path decodes every
file on threads as the loaders do, so its features are theirs bit for bit; with JPEGs given to
``decode_jpeg`` (what a GPU does with nvJPEG, here on torchvision's CPU decoder) they agree
within a stated tolerance; decoded pixels are kept and read under their decoder's name; a
stopped or failing pass leaves no thread and no entry behind. tests/engine/test_cuda.py holds
the same checks for nvJPEG on a GPU."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.data import Augmentation, ImageDataset, Sample, eval_transform
from engine.decoded import DecodedCache
from engine.device_decode import DeviceBatches, plan
from engine.errors import JobCancelled
from engine.features import extract_features
from engine.gather import Gathered, gather_images
from engine.nvjpeg import Frame, jpeg_frame
from engine.preprocessing import Preprocessing
from engine.weights import load_classifier
from tests.engine.test_decoded import extract
from tests.support.photos import KINDS, write_photos

CPU = torch.device("cpu")
# The features of a JPEG decoded by decode_jpeg against the loaders' (PIL): the least cosine
# similarity of an image's two feature vectors. libjpeg decodes a photo twice the input size or
# more scaled down (DCT scaling); the device path takes block means by the same factor. Measured
# here with torchvision's CPU decoder: 0.99984 (48x36 photos) and 0.99977 (192x144), so 0.999;
# nvJPEG's IDCT and chroma upsampling are not libjpeg's, so on a GPU 0.995 (test_cuda.py).
CPU_DECODER_COSINE = 0.999
NVJPEG_COSINE = 0.995


@pytest.fixture(scope="module")
def classifier(base_weights: Path):
    return load_classifier(ARCH, len(OLD), base_weights)


def photo_set(root: Path, n: int, size: tuple[int, int]) -> Gathered:
    samples = write_photos(root, n, size)
    samples = [Sample(s.path, str(OLD[i % len(OLD)])) for i, s in enumerate(samples)]
    return gather_images(samples, [str(d) for d in OLD], len(OLD), [], lambda _: [], {}, 512)


def features(classifier, batches) -> torch.Tensor:
    model, head = classifier
    feats, order = extract_features(model, head, batches, CPU)
    assert order.tolist() == list(range(len(order)))
    return feats


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "graft-decode"]


def test_the_jpeg_header_says_what_the_device_may_decode(tmp_path):
    samples = write_photos(tmp_path, len(KINDS), (40, 30))
    found = {s.path.stem.split("-")[1]: jpeg_frame(s.path.read_bytes()) for s in samples}
    assert found == {
        "baseline": Frame(3, 30, 40),
        "progressive": Frame(3, 30, 40),
        "grey": Frame(1, 30, 40),
        "cmyk": None,
        "png": None,
    }
    whole = samples[0].path.read_bytes()
    assert jpeg_frame(whole[:20]) is None  # cut before its frame header
    assert jpeg_frame(b"\xff\xd8\xff\xe0\x00\x01") is None  # a length that cannot be
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00"  # APP14, then its transform
    assert jpeg_frame(whole[:2] + adobe + b"\x00" + whole[2:]) is None  # RGB-coded
    assert jpeg_frame(whole[:2] + adobe + b"\x01" + whole[2:]) == Frame(3, 30, 40)  # YCbCr


def test_the_device_path_on_a_cpu_gives_the_loaders_features_bit_for_bit(tmp_path, classifier):
    images = photo_set(tmp_path / "photos", 20, (48, 36))
    aug = Augmentation(views=3, hflip=True, rotation_degrees=10)
    # 12 images trained on (three views each, the clean one first), 8 held out (one view)
    kw = {"views": 3, "aug": aug, "train": list(range(12))}
    loaders = extract(classifier, images, None, decode="loaders", **kw)
    assert images.decoding == {"where": "loaders", "decoder": "pil"}
    cache = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    device = extract(classifier, images, cache, 2, decode="device", **kw)
    assert images.decoding == {"where": "device", "decoder": "pil", "images": {"cpu": 20}}
    assert images.decoded["state"] == "stored"
    assert torch.equal(device.x, loaders.x)  # augmented views from the same seeded loaders
    assert torch.equal(device.group, loaders.group)
    assert torch.equal(device.clean, loaders.clean)
    # the loaders read the pixels the device path kept, both parts at their offsets
    again = extract(classifier, images, cache, decode="loaders", **kw)
    assert images.decoded["state"] == "hit"
    assert torch.equal(again.x, loaders.x)
    assert plan("auto", CPU, D.PREP).on_device is False  # a CPU decodes in its loaders
    nearest = Preprocessing(input_size=(3, 32, 32), interpolation="nearest")
    assert plan("device", CPU, nearest).on_device is False  # not resizable on the device


@pytest.mark.parametrize("size", [(48, 36), (192, 144)])
def test_jpegs_given_to_decode_jpeg_agree_with_the_loaders(tmp_path, classifier, size):
    samples = write_photos(tmp_path, 25, size)
    loaders = features(
        classifier, DataLoader(ImageDataset(samples, D.PREP, eval_transform(D.PREP)), batch_size=8)
    )
    batches = DeviceBatches(samples, D.PREP, CPU, 8, threads=3, jpeg_on_device=True)
    device = features(classifier, batches)
    # CMYK and PNG go to the CPU threads: their pixels, and so their features, are the loaders'
    assert batches.decoded == {"device": 15, "cpu": 10}
    on_cpu = [i for i, s in enumerate(samples) if s.path.stem.endswith(("cmyk", "png"))]
    assert torch.equal(device[on_cpu], loaders[on_cpu])
    cosine = F.cosine_similarity(device, loaders)
    print(f"{size}: least cosine {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() >= CPU_DECODER_COSINE
    assert not torch.equal(device, loaders)  # decode_jpeg did decode the others


def test_pixels_decoded_on_the_device_are_kept_under_their_decoder(tmp_path, classifier):
    samples = write_photos(tmp_path / "photos", 12, (48, 36))
    cache = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    digests = [s.path.name for s in samples]

    def run(jpeg_on_device: bool) -> tuple[torch.Tensor, DeviceBatches, dict]:
        entry = cache.entry(digests, D.PREP, plan_decoder(jpeg_on_device))
        batches = DeviceBatches(
            samples, D.PREP, CPU, 5, rows=entry.rows, jpeg_on_device=jpeg_on_device
        )
        feats = features(classifier, batches)
        entry.commit()
        return feats, batches, entry.report()

    first, batches, report = run(True)
    assert report["state"] == "stored" and batches.decoded == {"device": 8, "cpu": 4}
    pil, _, report = run(False)  # the loaders' pixels are not decode_jpeg's: their own entry
    assert report["state"] == "stored"
    for sample in samples:  # nothing can be decoded from the files any more
        sample.path.write_bytes(b"not an image")
    second, batches, report = run(True)
    assert report["state"] == "hit" and batches.decoded == {"stored": 12}
    assert torch.equal(second, first)
    assert torch.equal(run(False)[0], pil)


def plan_decoder(jpeg_on_device: bool) -> str:
    return "decode_jpeg:cpu" if jpeg_on_device else "pil"


def test_a_stopped_pass_leaves_no_thread_and_keeps_no_pixels(tmp_path, classifier):
    images = photo_set(tmp_path / "photos", 40, (48, 36))
    cache = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(JobCancelled):
        extract(
            classifier, images, cache, decode="device", batch_size=8, should_stop=stop_after_two
        )
    assert decode_threads() == []
    assert not [p for p in (tmp_path / "decoded").rglob("*") if p.is_file()]


@pytest.mark.parametrize("broken", ["not a JPEG", "cut short"])
def test_an_undecodable_file_fails_the_pass_as_in_the_loaders(tmp_path, classifier, broken):
    samples = write_photos(tmp_path, 10, (48, 36))
    whole = samples[5].path.read_bytes()  # a baseline JPEG: its header intact when cut short
    bad = (
        b"\xff\xd8\xff not a JPEG after all"
        if broken == "not a JPEG"
        else whole[: len(whole) * 3 // 4]
    )
    samples[5].path.write_bytes(bad)
    for jpeg_on_device in (False, True):  # decode_jpeg refuses it too, then PIL does
        batches = DeviceBatches(samples, D.PREP, CPU, 4, jpeg_on_device=jpeg_on_device)
        with pytest.raises(OSError, match="cannot identify|truncated"):
            features(classifier, batches)
        assert decode_threads() == []
    with pytest.raises(OSError, match="cannot identify|truncated"):
        features(classifier, DataLoader(ImageDataset(samples, D.PREP, eval_transform(D.PREP))))
