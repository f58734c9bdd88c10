"""Head expansion across 42 architectures (timm, torchvision, Hugging Face transformers built
from small configs, and Keras): old rows and old logits stay exactly as they were, and the expanded
model exports to ONNX with onnxruntime agreeing with torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision.models
from torch import nn

from engine.architectures import build_model
from engine.errors import UnsupportedHead
from engine.export import export_onnx
from engine.heads import expand_head, find_head
from engine.preprocessing import Preprocessing

# (family, name, builder kwargs, input size); small inputs keep each case well under a second.
ARCHITECTURES = [
    ("timm", "resnet18", {}, 32),
    ("timm", "resnet10t", {}, 32),
    ("timm", "mobilenetv3_small_050", {}, 32),
    ("timm", "efficientnet_b0", {}, 32),
    ("timm", "convnext_atto", {}, 32),
    ("timm", "regnetx_002", {}, 32),
    ("timm", "ghostnet_050", {}, 32),
    ("timm", "vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("timm", "densenet121", {}, 32),
    ("torchvision", "resnet18", {}, 32),
    ("torchvision", "mobilenet_v3_small", {}, 32),
    ("torchvision", "mobilenet_v2", {}, 32),
    ("torchvision", "efficientnet_b0", {}, 32),
    ("torchvision", "shufflenet_v2_x0_5", {}, 32),
    ("torchvision", "mnasnet0_5", {}, 32),
    ("torchvision", "regnet_y_400mf", {}, 32),
    ("torchvision", "densenet121", {}, 32),
    ("torchvision", "convnext_tiny", {}, 32),
    ("torchvision", "swin_t", {}, 32),
    ("torchvision", "vit_b_16", {"image_size": 32}, 32),
    ("timm", "mobilevit_xxs", {}, 64),
    ("timm", "rexnet_100", {}, 32),
    ("timm", "mixnet_s", {}, 32),
    ("timm", "tf_efficientnet_lite0", {}, 32),
    ("timm", "efficientvit_b0", {}, 64),
    ("timm", "regnety_002", {}, 32),
    ("timm", "resnet50d", {}, 32),
    ("torchvision", "mobilenet_v3_large", {}, 32),
    ("torchvision", "regnet_x_400mf", {}, 32),
    ("torchvision", "googlenet", {"aux_logits": False, "init_weights": True}, 32),
    ("torchvision", "resnext50_32x4d", {}, 32),
    # Hugging Face: the kwargs are the config.json (small; no hub)
    *(
        ("hf", name, {"architectures": [name], "model_type": kind, **config}, size)
        for name, kind, config, size in [
            (
                "ViTForImageClassification",
                "vit",
                {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                },
                32,
            ),
            (
                "ResNetForImageClassification",
                "resnet",
                {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]},
                32,
            ),
            (
                "ConvNextForImageClassification",
                "convnext",
                {"num_stages": 2, "hidden_sizes": [16, 32], "depths": [1, 1]},
                32,
            ),
            (
                "SwinForImageClassification",
                "swin",
                {
                    "image_size": 32,
                    "patch_size": 4,
                    "embed_dim": 16,
                    "depths": [1, 1],
                    "num_heads": [1, 2],
                    "window_size": 4,
                },
                32,
            ),
            (
                "DeiTForImageClassification",
                "deit",
                {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                },
                32,
            ),
            (
                "MobileViTForImageClassification",
                "mobilevit",
                {
                    "image_size": 64,
                    "hidden_sizes": [32, 40, 48],
                    "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64],
                },
                64,
            ),
            (
                "BeitForImageClassification",
                "beit",
                {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                    "use_mean_pooling": True,
                },
                32,
            ),
            (
                "Dinov2ForImageClassification",
                "dinov2",
                {
                    "image_size": 32,
                    "patch_size": 8,
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                },
                32,
            ),
        ]
    ),
    # Keras 3 on its PyTorch backend: the kwargs name the layers of a small functional model
    ("keras", "convnet", {"layers": "conv"}, 32),
    ("keras", "mlp", {"layers": "dense"}, 32),
]


def keras_model(layers: str, num_classes: int) -> nn.Module:
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    from engine.keras_family import KerasClassifier

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    if layers == "conv":
        x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return KerasClassifier(keras.Model(inputs, outputs)).eval()


def make(family: str, name: str, kwargs: dict, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    if family == "keras":
        return keras_model(kwargs["layers"], num_classes)
    if family == "hf":
        pytest.importorskip("transformers")
        from engine import hf

        return hf.build(kwargs, num_classes)
    if family == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return model.eval()


@pytest.mark.parametrize(
    ("family", "name", "kwargs", "size"),
    ARCHITECTURES,
    ids=[f"{a}:{b}" for a, b, *_ in ARCHITECTURES],
)
def test_expanding_the_head_keeps_old_logits_exact(family, name, kwargs, size, tmp_path):
    model = make(family, name, kwargs)
    with torch.no_grad():  # some builders zero their heads; random rows make the check bite
        find_head(model).module.weight.normal_(std=0.05)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        before = model(x)
    head = find_head(model)
    old_weight = head.module.weight.detach().clone()

    grown = expand_head(model, head, new_rows=3)

    assert grown.num_classes == 10
    assert torch.equal(grown.module.weight[:7], old_weight)
    with torch.inference_mode():
        after = model(x)
    assert after.shape == (2, 10)
    torch.testing.assert_close(after[:, :7], before, rtol=0, atol=1e-5)

    # The expanded model exports to ONNX and onnxruntime agrees with torch.
    path = tmp_path / "model.onnx"
    export_onnx(model, Preprocessing(input_size=(3, size, size)), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(exported, after.numpy(), rtol=1e-4, atol=1e-4)


def test_heads_without_bias_are_expanded_without_bias():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    model = Tiny()
    grown = expand_head(model, find_head(model), 2)
    assert grown.module.bias is None
    assert model(torch.randn(1, 3, 2, 2)).shape == (1, 6)


def test_a_convolutional_classifier_is_refused_with_a_reason():
    with pytest.raises(UnsupportedHead, match="Linear"):
        find_head(make("torchvision", "squeezenet1_0", {}))


def test_a_model_with_a_distillation_head_is_refused():
    with pytest.raises(UnsupportedHead, match="several classifier heads"):
        find_head(build_model("timm:levit_128s", 5))
