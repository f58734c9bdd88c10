"""Hugging Face image classifiers: a small ViT and a ResNet built from a config (no hub), trained
here on digits 0-8, saved with save_pretrained, taught "9" by the engine, and written back as a
folder that transformers' own from_pretrained loads offline."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

from devkit import digits as D  # noqa: E402
from devkit.digits import OLD  # noqa: E402
from engine import hf  # noqa: E402
from engine.architectures import parse_architecture  # noqa: E402
from engine.data import scan_image_folder  # noqa: E402
from engine.errors import UnknownArchitecture, WeightsError  # noqa: E402
from engine.expand import ExpansionConfig, ExpansionRequest, expand_classifier  # noqa: E402
from engine.weights import load_classifier, save_safetensors  # noqa: E402

OLD_LABELS = [str(d) for d in OLD]
CONFIGS = {  # (config, epochs of training on digits 0-8: 85-95 % held-out accuracy)
    "vit": (
        transformers.ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            architectures=["ViTForImageClassification"],
        ),
        25,
    ),
    "resnet": (
        transformers.ResNetConfig(
            embedding_size=32,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            architectures=["ResNetForImageClassification"],
        ),
        10,
    ),
}


def pretrained_folder(tmp_path, digit_splits, kind: str):
    """A classifier of digits 0-8 as save_pretrained writes it, with its preprocessing."""
    base, _ = digit_splits
    config, epochs = CONFIGS[kind]
    model = D.train_base(base, OLD, model=hf.build(config.to_dict(), OLD_LABELS), epochs=epochs)
    folder = tmp_path / kind
    hf.write_folder(model, OLD_LABELS, D.PREP, folder)
    return folder


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def grown(request, tmp_path_factory, digit_splits):
    """(the base folder, the engine's result, the new version's folder)."""
    tmp = tmp_path_factory.mktemp(request.param)
    folder = pretrained_folder(tmp, digit_splits, request.param)
    model, prep = hf.read_folder(folder)
    architecture = hf.architecture_of(model.config.to_dict())
    weights = tmp / "graft.safetensors"
    save_safetensors(weights, model, {"labels": OLD_LABELS})

    _, held = digit_splits
    folders = {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:25]}
    root = D.write_image_folder(tmp / "images", folders)
    result = expand_classifier(
        ExpansionRequest(
            architecture,
            OLD_LABELS,
            weights,
            prep,
            scan_image_folder(root),
            ["9"],
            ExpansionConfig(),
        )
    )
    out = tmp / "v2"
    hf.write_folder(result.model, [*OLD_LABELS, "9"], prep, out)
    return folder, result, out


def test_the_folder_reads_back_with_its_architecture_and_preprocessing(tmp_path, digit_splits):
    folder = pretrained_folder(tmp_path, digit_splits, "resnet")
    model, prep = hf.read_folder(folder)
    assert hf.architecture_of(model.config.to_dict()) == "hf:ResNetForImageClassification"
    assert parse_architecture("hf:ResNetForImageClassification") == (
        "hf",
        "ResNetForImageClassification",
    )
    assert prep == D.PREP
    assert model.config.id2label == dict(enumerate(OLD_LABELS))


def test_a_version_loads_with_from_pretrained_keeps_old_logits_and_knows_the_new_label(
    grown, digit_splits
):
    base_folder, result, folder = grown
    _, held = digit_splits
    loaded = transformers.AutoModelForImageClassification.from_pretrained(
        str(folder), local_files_only=True
    ).eval()
    base = transformers.AutoModelForImageClassification.from_pretrained(
        str(base_folder), local_files_only=True
    ).eval()
    assert loaded.config.id2label == {i: label for i, label in enumerate([*OLD_LABELS, "9"])}
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3

    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = torch.tensor([d for d in range(10) for _ in held.of(d)[40:]])
    x = D.tensors(images)
    with torch.inference_mode():
        after = loaded(pixel_values=x).logits
        before = base(pixel_values=x).logits
    old = targets < 9
    acc_before = (before.argmax(1)[old] == targets[old]).float().mean().item()
    acc_after = (after.argmax(1)[old] == targets[old]).float().mean().item()
    recall = (after.argmax(1)[~old] == 9).float().mean().item()
    assert acc_before > 0.8, acc_before
    assert acc_after >= acc_before - 0.03, (acc_before, acc_after)
    assert recall > 0.3, recall  # 25 images of "9"; chance is 0.1, a dead new row 0
    m = result.metrics
    assert m["new_classes"]["n"] >= 10 and m["old_classes"]["n"] >= 100


def test_the_engine_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(UnknownArchitecture) as excinfo:
        parse_architecture("hf:VitForImageClassification")
    assert "hf:ViTForImageClassification" in str(excinfo.value)
    plain = tmp_path / "plain.safetensors"
    save_safetensors(plain, torch.nn.Linear(2, 2), {})
    with pytest.raises(WeightsError, match="config.json"):
        load_classifier("hf:ViTForImageClassification", 2, plain)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps(CONFIGS["vit"][0].to_dict()))
    save_safetensors(tmp_path / "folder" / "model.safetensors", torch.nn.Linear(2, 2), {})
    with pytest.raises(WeightsError, match="74,562 parameters but model.safetensors holds 6"):
        hf.read_folder(tmp_path / "folder")  # checked before anything is built
    as_many = {"wrong.name": torch.zeros(74_562)}  # as many values, under other names
    safetensors.torch.save_file(as_many, str(tmp_path / "folder" / "model.safetensors"))
    with pytest.raises(WeightsError, match="missing"):  # not a random init, silently
        hf.read_folder(tmp_path / "folder")
    (tmp_path / "folder" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        hf.read_folder(tmp_path / "folder")
