"""Calibration of the new labels, the few-shot rule, and features that spill to disk."""

from __future__ import annotations

import pytest
import torch

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.calibrate import (
    Calibration,
    Pool,
    calibrate,
    fold_into_layer,
    weight_aligning_scale,
)
from engine.data import Augmentation
from engine.expand import ExpansionConfig, ExpansionRequest, expand_classifier
from engine.weights import load_classifier
from tests.conftest import digits_request


def _request(tmp_path, held: D.Digits, base_weights, shots: int, **config) -> ExpansionRequest:
    folders = {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:shots]}
    root = D.write_image_folder(tmp_path / f"images-{shots}", folders)
    return digits_request(base_weights, root, ExpansionConfig(**config))


def _held_out(model, held: D.Digits) -> tuple[float, float]:
    """(old-class accuracy, recall of 9) on images from index 40 on: in no upload."""
    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = torch.tensor([d for d in range(10) for _ in held.of(d)[40:]])
    with torch.inference_mode():
        predicted = model(D.tensors(images)).argmax(1)
    old = targets < 9
    return (
        (predicted[old] == targets[old]).float().mean().item(),
        (predicted[~old] == 9).float().mean().item(),
    )


def _biased_pool(shift: float) -> Pool:
    """Three old classes and one new: its logits ``shift`` too high on held-out images."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(50)
    logits = torch.randn(200, 4, generator=generator)
    logits[torch.arange(200), targets] += 3.0
    logits[:, 3] += shift
    return Pool(logits, targets)


def test_bias_correction_undoes_a_new_label_that_swallows_old_images():
    pool = _biased_pool(shift=4.0)
    weight = torch.ones(4, 8)
    old_before = (pool.logits[pool.targets < 3].argmax(1) == pool.targets[pool.targets < 3]).float()
    assert old_before.mean() < 0.5  # uncorrected, the new label takes most old images

    choice = calibrate(weight, 3, pool, Calibration("bias_correction"))
    assert choice.method == "bias_correction"
    assert choice.beta < -2.0
    assert choice.old_accuracy > 0.9 and choice.new_accuracy > 0.9

    uncorrected = calibrate(weight, 3, pool, Calibration("none"))
    assert (uncorrected.alpha, uncorrected.beta) == (1.0, 0.0)
    assert uncorrected.old_accuracy < 0.5


def test_no_correction_may_cost_the_old_labels_more_than_the_budget():
    pool = _biased_pool(shift=-3.0)  # a timid new label: recall bought with old images
    weight = torch.ones(4, 8)
    ceiling = (pool.logits[:150, :3].argmax(1) == pool.targets[:150]).float().mean().item()
    for budget in (0.0, 0.02, 0.1):
        choice = calibrate(weight, 3, pool, Calibration("bias_correction", max_old_drop=budget))
        assert choice.old_accuracy >= ceiling - budget - 1e-9
    strict = calibrate(weight, 3, pool, Calibration("bias_correction", max_old_drop=0.0))
    loose = calibrate(weight, 3, pool, Calibration("bias_correction", max_old_drop=0.1))
    assert loose.new_accuracy > strict.new_accuracy
    # the default only brakes: a timid new label is left alone, never pushed up
    assert calibrate(weight, 3, pool, Calibration()).beta == 0.0


def test_the_default_brakes_only_on_a_loss_beyond_noise():
    greedy = _biased_pool(shift=4.0)  # the new label takes most old images
    choice = calibrate(torch.ones(4, 8), 3, greedy, Calibration())
    assert choice.method == "brake" and max(choice.beta) < 0 and choice.alpha == 1.0
    old = greedy.targets < 3
    ceiling = (greedy.logits[old, :3].argmax(1) == greedy.targets[old]).float().mean().item()
    assert choice.old_accuracy >= ceiling - 0.01 - 1e-9
    slight = _biased_pool(shift=0.0)  # a few old images lost: within noise, left as fitted
    assert calibrate(torch.ones(4, 8), 3, slight, Calibration()).method == "none"


def test_the_correction_folds_into_a_plain_linear_layer():
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(5, 16, generator=generator), torch.randn(5, generator=generator)
    x = torch.randn(32, 16, generator=generator)
    folded_w, folded_b = fold_into_layer(weight, bias, 3, alpha=0.7, beta=-1.5)
    logits, folded = x @ weight.T + bias, x @ folded_w.T + folded_b
    assert torch.equal(folded[:, :3], logits[:, :3])
    torch.testing.assert_close(folded[:, 3:], 0.7 * logits[:, 3:] - 1.5)
    aligned = fold_into_layer(weight, bias, 3, weight_aligning_scale(weight, 3), 0.0)[0]
    torch.testing.assert_close(aligned[3:].norm(dim=1).mean(), weight[:3].norm(dim=1).mean())


def test_one_shot_gets_the_imprint_bias_and_keeps_the_old_labels(
    tmp_path, digit_splits, base_weights
):
    _, held = digit_splits
    result = expand_classifier(_request(tmp_path, held, base_weights, shots=1))
    m = result.metrics
    assert m["history"] == [] and m["method"] == "imprint+refit"
    assert m["calibration"]["pool"]["new"] == 1  # its one image, scored in-sample
    assert m["calibration"]["limited"] is True  # too little to favour it
    assert m["measurement"]["unmeasured"] == {"9": 1}  # a label's only image cannot be held out
    base, _ = load_classifier(ARCH, 9, base_weights)
    old_before, _ = _held_out(base, held)
    old_after, _ = _held_out(result.model, held)
    assert old_before - old_after <= 0.015


@pytest.mark.parametrize("views", [1, 3])
def test_a_two_image_label_keeps_its_imprint_while_a_label_with_many_is_trained(
    tmp_path, digit_splits, base_weights, views
):
    from PIL import ImageOps

    from engine.train import HeadTraining

    _, held = digit_splits
    mirrored = [ImageOps.mirror(im) for im in held.of(3)[:2]]  # "ε": a second new label
    new = {"9": held.of(9)[:15], "mirrored-3": mirrored}
    folders = {str(d): held.of(d)[:20] for d in OLD} | new
    root = D.write_image_folder(tmp_path / "images", folders)
    aug = Augmentation(views=views, rotation_degrees=10.0) if views > 1 else Augmentation()

    def run(epochs: int) -> torch.Tensor:
        training = HeadTraining(epochs=epochs)
        config = ExpansionConfig(augmentation=aug, training=training, solver="sgd")
        result = expand_classifier(digits_request(base_weights, root, config, tuple(new)))
        assert bool(result.metrics["history"]) == (epochs > 0)
        return result.model.get_classifier().weight.detach()

    trained, imprinted = run(30), run(0)
    cosine = torch.nn.functional.cosine_similarity(trained[9:], imprinted[9:])
    assert cosine[1] > 0.9999  # two images (however many views): the imprint, only rescaled
    assert cosine[0] < 0.999  # fifteen images: trained


def test_without_old_label_images_the_new_logits_are_left_as_trained():
    pool = _biased_pool(shift=-3.0)  # a shift up would only gain
    new_only = pool.targets >= 3
    new_pool = Pool(pool.logits[new_only], pool.targets[new_only])
    choice = calibrate(torch.ones(4, 8), 3, new_pool, Calibration())
    assert (choice.method, choice.alpha, choice.beta) == ("none", 1.0, 0.0)


def test_calibration_is_reported_and_is_what_the_model_computes(
    tmp_path, digit_splits, base_weights
):
    _, held = digit_splits
    result = expand_classifier(_request(tmp_path, held, base_weights, shots=10))
    cal = result.metrics["calibration"]
    assert cal["method"] in {"none", "weight_aligning", "bias_correction"}
    # chosen on every image, each scored by rows refitted without it
    assert cal["pool"] == {"old": 180, "new": 10}
    assert cal["pool_old_accuracy"] >= 0.9
    uncalibrated = expand_classifier(
        _request(tmp_path, held, base_weights, shots=10, calibration=Calibration("none"))
    )
    assert uncalibrated.metrics["calibration"]["method"] == "none"
    head = result.model.get_classifier()
    raw = uncalibrated.model.get_classifier()
    assert torch.equal(head.weight[:9], raw.weight[:9])
    torch.testing.assert_close(head.weight[9], raw.weight[9] * cal["alpha"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("views", [1, 3])
def test_features_beyond_the_memory_budget_spill_to_disk_with_the_same_result(
    tmp_path, digit_splits, base_weights, views
):
    _, held = digit_splits
    spill = tmp_path / "spill"
    aug = {"views": views, "rotation_degrees": 5.0} if views > 1 else {}

    def run(memory_bytes: int):
        return expand_classifier(
            _request(
                tmp_path,
                held,
                base_weights,
                shots=10,
                feature_memory_bytes=memory_bytes,
                spill_dir=spill,
                augmentation=Augmentation(**aug),
            )
        )

    in_memory, spilled = run(1 << 30), run(0)
    assert in_memory.metrics["feature_cache"]["disk_bytes"] == 0
    rows = (180 + 10) * views  # every image, with its views
    assert spilled.metrics["feature_cache"]["disk_bytes"] >= rows * 512 * 4
    assert spilled.metrics["feature_cache"]["memory_bytes"] == 0
    pairs = zip(
        in_memory.model.state_dict().values(), spilled.model.state_dict().values(), strict=True
    )
    for a, b in pairs:
        assert torch.equal(a, b)
    assert list(spill.iterdir()) == []  # the files went with the job


def test_a_layer_without_bias_is_corrected_by_scale_alone():
    pool = _biased_pool(shift=4.0)
    choice = calibrate(torch.ones(4, 8), 3, pool, Calibration("bias_correction"), shift=False)
    assert choice.beta == 0.0 and choice.alpha < 1.0  # the only correction it can hold


def test_trainable_old_rows_adapt_slowly_and_distillation_holds_them(
    tmp_path, digit_splits, base_weights
):
    from engine.train import HeadTraining

    _, held = digit_splits
    base, _ = load_classifier(ARCH, 9, base_weights)
    original = base.get_classifier().weight.detach()

    def old_rows(**training):
        config = {"training": HeadTraining(old_rows_frozen=False, **training), "solver": "sgd"}
        result = expand_classifier(_request(tmp_path, held, base_weights, shots=10, **config))
        return result, result.model.get_classifier().weight.detach()[:9]

    distilled, rows = old_rows()
    drift = (rows - original).norm() / original.norm()
    assert 0 < drift < 0.1  # they moved, a little
    old_before, _ = _held_out(base, held)
    old_after, recall = _held_out(distilled.model, held)
    assert old_before - old_after <= 0.015 and recall > 0.5
    _, free = old_rows(distillation_weight=0.0, old_rows_lr_scale=1.0, epochs=100)
    assert (free - original).norm() / original.norm() > 2 * drift


def _two_new_labels(greedy: float) -> Pool:
    """Three old labels and two new: the first new label's logits ``greedy`` too high on old
    images of label 0, the second well behaved."""
    generator = torch.Generator().manual_seed(2)
    targets = torch.arange(5).repeat_interleave(60)
    logits = torch.randn(300, 5, generator=generator)
    logits[torch.arange(300), targets] += 4.0
    logits[targets == 0, 3] += greedy
    return Pool(logits, targets)


def test_the_brake_lowers_only_the_new_label_that_takes_old_images():
    pool = _two_new_labels(greedy=4.0)
    choice = calibrate(torch.ones(5, 8), 3, pool, Calibration())
    assert choice.method == "brake" and choice.beta[0] < 0 and choice.beta[1] == 0.0
    old = pool.targets < 3
    ceiling = (pool.logits[old, :3].argmax(1) == pool.targets[old]).float().mean().item()
    assert choice.old_accuracy >= ceiling - 0.01 - 1e-9
    folded_w, folded_b = fold_into_layer(torch.ones(5, 8), torch.zeros(5), 3, 1.0, choice.beta)
    assert folded_b[3] == choice.beta[0] and folded_b[4] == 0.0


def test_auto_brakes_a_layer_without_bias_by_scale_and_never_boosts_it():
    timid = _biased_pool(shift=-3.0)  # a full search would scale these logits up
    choice = calibrate(torch.ones(4, 8), 3, timid, Calibration(), shift=False, limited=True)
    assert choice.method == "none" and choice.alpha == 1.0
    greedy = _two_new_labels(greedy=4.0)
    braked = calibrate(torch.ones(5, 8), 3, greedy, Calibration(), shift=False)
    assert braked.method == "brake" and braked.beta == 0.0
    assert 0 < braked.alpha[0] < 1.0 and braked.alpha[1] == 1.0
