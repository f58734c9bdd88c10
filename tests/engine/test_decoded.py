"""The decoded-pixels cache (engine/decoded.py): a second pass over the same images reads the
pixels the first one kept, with the features of a pass that decoded, bit for bit; a pass that
fails keeps nothing; the folder stays within its budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.data import Augmentation, scan_image_folder
from engine.decoded import DecodedCache
from engine.errors import JobCancelled
from engine.features import FeatureCache
from engine.gather import Gathered, extract_rows, gather_images
from engine.recipe import Rows
from engine.weights import load_classifier

LABELS = [str(d) for d in OLD] + ["9"]


@pytest.fixture(scope="module")
def classifier(base_weights: Path):
    return load_classifier(ARCH, len(OLD), base_weights)


def image_set(root: Path, digits: D.Digits, per_label: int) -> Gathered:
    folders = {label: digits.of(int(label))[:per_label] for label in LABELS}
    samples = scan_image_folder(D.write_image_folder(root, folders))
    return gather_images(samples, LABELS, len(OLD), [], lambda _: [], {}, 512)


def extract(
    classifier, images: Gathered, decoded: DecodedCache | None, workers: int = 0, **kw
) -> Rows:
    model, head = classifier
    return extract_rows(
        model,
        head,
        images,
        train=kw.pop("train", list(range(len(images.targets)))),
        prep=D.PREP,
        views=kw.pop("views", 1),
        aug=kw.pop("aug", Augmentation()),
        batch_size=kw.pop("batch_size", 16),
        num_workers=workers,
        seed=0,
        device=torch.device("cpu"),
        cache=FeatureCache(1 << 30),
        on_batch=lambda *_: None,
        should_stop=kw.pop("should_stop", lambda: False),
        decoded=decoded,
        decode=kw.pop("decode", "auto"),
    )


def entries(root: Path) -> list[str]:
    return sorted(p.suffix for p in root.rglob("*") if p.is_file())


def test_a_second_pass_reads_the_kept_pixels_and_gets_the_same_features(
    tmp_path, classifier, digit_splits
):
    images = image_set(tmp_path / "images", digit_splits[1], 6)
    decoded = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    decoding = extract(classifier, images, None)
    first = extract(classifier, images, decoded, workers=2)  # loader processes write the rows
    assert images.decoded == {"state": "stored", "images": 60, "bytes": 60 * 3 * 32 * 32}
    assert entries(tmp_path / "decoded") == [".u8"]
    assert torch.equal(first.x, decoding.x)

    for sample in images.samples:  # nothing can be decoded from the files any more
        sample.path.write_bytes(b"not an image")
    second = extract(classifier, images, decoded)
    assert images.decoded["state"] == "hit"
    assert torch.equal(second.x, decoding.x)
    assert torch.equal(second.group, decoding.group)


def test_augmented_views_still_decode_and_only_the_clean_ones_are_kept(
    tmp_path, classifier, digit_splits
):
    images = image_set(tmp_path / "images", digit_splits[1], 3)
    decoded = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    aug = Augmentation(views=3, rotation_degrees=10)
    plain = extract(classifier, images, None, views=3, aug=aug)
    kept = extract(classifier, images, decoded, views=3, aug=aug)
    assert images.decoded["images"] == 30  # one clean view of each image
    assert torch.equal(kept.x, plain.x)  # the augmented views are the same ones, too
    again = extract(classifier, images, decoded, views=3, aug=aug)
    assert images.decoded["state"] == "hit"
    assert torch.equal(again.x, plain.x)


def test_a_cancelled_pass_keeps_nothing(tmp_path, classifier, digit_splits):
    images = image_set(tmp_path / "images", digit_splits[1], 6)
    decoded = DecodedCache(tmp_path / "decoded", "dataset-1", 1 << 30)
    calls = iter(range(1000))
    with pytest.raises(JobCancelled):
        extract(classifier, images, decoded, should_stop=lambda: next(calls) >= 2)
    assert entries(tmp_path / "decoded") == []  # no entry, and no partial file
    extract(classifier, images, decoded)
    assert images.decoded["state"] == "stored"


def test_the_folder_keeps_to_its_budget_least_recently_used_first(
    tmp_path, classifier, digit_splits
):
    one_set = 30 * 3 * 32 * 32
    a = image_set(tmp_path / "a", digit_splits[1], 3)
    b = image_set(tmp_path / "b", digit_splits[0], 3)
    c = image_set(tmp_path / "c", digit_splits[0], 2)
    root = tmp_path / "decoded"
    extract(classifier, a, DecodedCache(root, "dataset-a", 2 * one_set))
    extract(classifier, b, DecodedCache(root, "dataset-b", 2 * one_set))
    extract(classifier, a, DecodedCache(root, "dataset-a", 2 * one_set))
    assert a.decoded["state"] == "hit"  # a is now the most recently used
    extract(classifier, c, DecodedCache(root, "dataset-c", 2 * one_set))
    assert c.decoded["state"] == "stored"
    assert sorted(p.parent.name for p in root.rglob("*.u8")) == ["dataset-a", "dataset-c"]

    big = image_set(tmp_path / "big", digit_splits[0], 7)  # 70 images: more than the budget
    rows = extract(classifier, big, DecodedCache(root, "dataset-big", 2 * one_set))
    assert big.decoded["state"] == "off" and len(rows.x) == 70
    assert sorted(p.parent.name for p in root.rglob("*.u8")) == ["dataset-a", "dataset-c"]


def test_pixels_that_would_take_the_disk_below_its_reserve_are_not_kept(
    tmp_path, classifier, digit_splits
):
    images = image_set(tmp_path / "images", digit_splits[1], 3)
    free = shutil.disk_usage(tmp_path).free
    root = tmp_path / "decoded"
    rows = extract(classifier, images, DecodedCache(root, "dataset-1", 1 << 30, free))
    assert images.decoded["state"] == "off" and len(rows.x) == 30
    assert not list(root.rglob("*.*"))  # no entry, no partial file
