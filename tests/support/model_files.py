"""Model files as other exporters write them, and hostile ones, built in a few milliseconds."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = ["a", "b", "c"]
PREP = {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}


def linear_graph(
    batch: int | str = "n", extra_nodes=(), opsets=(("", 18),), logits: str = "logits"
) -> onnx.ModelProto:
    """images [batch, 3, 8, 8] -> Flatten -> Gemm -> logits -> Softmax -> probabilities;
    ``logits`` names what the Softmax reads: an extra node's output puts the extra nodes on the
    path to the output; otherwise they follow it."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.normal(size=(3, 192)).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    head = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    softmax = helper.make_node("Softmax", [logits], ["probabilities"], axis=1)
    on_path = logits != "logits"  # else the extra nodes follow the output
    nodes = [*head, *extra_nodes, softmax] if on_path else [*head, softmax, *extra_nodes]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 3])],
        [weight, bias],
    )
    imports = [helper.make_opsetid(domain, version) for domain, version in opsets]
    return helper.make_model(graph, opset_imports=imports, ir_version=9)


def hf_zip(config: dict | str, tensors: bytes | None = None, extra: dict | None = None) -> bytes:
    """A zipped Hugging Face folder: ``config.json`` and ``model.safetensors``."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save  # noqa: PLC0415

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/config.json", json.dumps(config) if isinstance(config, dict) else config)
        zf.writestr("m/model.safetensors", tensors or save({"x": torch.zeros(4)}))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


RESNET = {
    "model_type": "resnet",
    "architectures": ["ResNetForImageClassification"],
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "num_labels": 3,
}


def keras_zip(config: str) -> bytes:
    """A ``.keras`` file (a zip of config, metadata and weights) around ``config``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", config)
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        zf.writestr("model.weights.h5", b"")
    return buffer.getvalue()


def keras_layers(n: int) -> str:
    """A Sequential config of ``n`` ReLU layers (a few KiB once compressed)."""
    layers = [
        {
            "module": "keras.layers",
            "class_name": "InputLayer",
            "config": {"batch_shape": [None, 8, 8, 3], "dtype": "float32", "name": "in"},
        }
    ] + [
        {"module": "keras.layers", "class_name": "ReLU", "config": {"name": f"r{i}"}}
        for i in range(n)
    ]
    return json.dumps(
        {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": layers}}
    )


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def pickle_exploit() -> bytes:
    """``torch.save``'s layout with a data.pkl that calls a function when unpickled."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"w": _Exploit()}))
        zf.writestr("evil/version", "3\n")
    return buffer.getvalue()


def huge_constant() -> bytes:
    """An ONNX graph whose input passes through a ConstantOfShape of 2^40 floats (4 TiB) on
    its way to a plain linear head: only running it finds the cost."""
    shape = numpy_helper.from_array(np.array([1 << 40], np.int64), "shape")
    model = linear_graph()
    nodes = list(model.graph.node)
    nodes[0].input[0] = "shifted"  # Flatten reads images + sum(zeros(2^40))
    extra = [
        helper.make_node("Constant", [], ["big_shape"], value=shape),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["images", "total"], ["shifted"]),
    ]
    del model.graph.node[:]
    model.graph.node.extend(extra + nodes)
    return model.SerializeToString()


def custom_operator() -> bytes:
    custom = [helper.make_node("Boom", ["logits"], ["boom"], domain="com.example.ops")]
    opsets = (("", 18), ("com.example.ops", 1))
    return linear_graph(extra_nodes=custom, opsets=opsets, logits="boom").SerializeToString()


def external_constant(location: str) -> bytes:
    """A Constant node whose value lives in a file at ``location`` (outside any upload)."""
    constant = helper.make_tensor("k", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    constant.data_location = TensorProto.EXTERNAL
    del constant.float_data[:]
    entry = constant.external_data.add()
    entry.key, entry.value = "location", location
    extra = [
        helper.make_node("Constant", [], ["k_out"], value=constant),
        helper.make_node("Add", ["logits", "k_out"], ["shifted"]),
    ]
    return linear_graph(extra_nodes=extra, logits="shifted").SerializeToString()


@dataclass(frozen=True)
class Upload:
    """One hostile model upload: what POST /v1/models receives."""

    case: str
    architecture: str
    filename: str
    make: Callable[[], bytes]


HOSTILE = [
    Upload("noise as a torch file", "timm:resnet18", "n.pt", lambda: b"\xff" * 64),
    Upload("noise as a .keras file", "keras:k", "n.keras", lambda: b"\xff" * 64),
    Upload("noise as ONNX", "onnx:o", "n.onnx", lambda: b"\xff" * 64),
    Upload("a pickle that calls a function", "timm:resnet18", "evil.pt", pickle_exploit),
    Upload("a .keras config nested 100,000 deep", "keras:k", "deep.keras",
           lambda: keras_zip("[" * 100_000 + "]" * 100_000)),
    Upload("a .keras of 3,000 layers", "keras:k", "long.keras",
           lambda: keras_zip(keras_layers(3000))),
    Upload("an HF config nested 100,000 deep", "hf:ResNetForImageClassification", "m.zip",
           lambda: hf_zip("[" * 100_000 + "]" * 100_000)),
    Upload("an HF model.safetensors of garbage", "hf:ResNetForImageClassification", "m.zip",
           lambda: hf_zip(RESNET, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")),
    Upload("an HF hidden size of 1e9", "hf:ResNetForImageClassification", "m.zip",
           lambda: hf_zip(RESNET | {"hidden_sizes": [10**9, 10**9]})),
    Upload("an HF config of a million labels", "hf:ResNetForImageClassification", "m.zip",
           lambda: hf_zip(RESNET | {"num_labels": 10**6})),
    Upload("an HF zip bomb", "hf:ResNetForImageClassification", "m.zip",
           lambda: hf_zip(RESNET, b"\0" * (40 * 1024 * 1024))),
    Upload("ONNX with a 4 TiB constant", "onnx:o", "big.onnx", huge_constant),
    Upload("ONNX with a custom operator", "onnx:o", "custom.onnx", custom_operator),
    Upload("ONNX reading /etc/hostname", "onnx:o", "ext.onnx",
           lambda: external_constant("/etc/hostname")),
]  # fmt: skip
