"""ONNX classifiers (``onnx:<name>``): the graph is kept, run by onnxruntime, and only the layer
that makes the logits is grown.

The classifier layer is the ``Gemm`` (or ``MatMul`` followed by ``Add``) that produces the
graph's output, directly or through a final ``Softmax``; its weights must be initializers.
Everything before it is the backbone: onnxruntime runs the original graph with the layer's
input added as an output, so features are the graph's own, whatever exporter wrote it
(converting the graph to torch, as onnx2torch does, fails on graphs of torch's own exporter).
:class:`OnnxClassifier` runs that backbone and the layer as a ``torch.nn.Linear``; the backbone
is never trained (Graft grows ONNX models with ``freeze='head'``).

A version is the original graph with the layer's initializers replaced by the grown ones (and
the output's class dimension updated): old logits are computed by the same operations on the
same values. Graft stores it in its safetensors file as one uint8 tensor holding the
serialized model, the layer's description in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import safetensors
import safetensors.torch
import torch
from onnx import helper, numpy_helper
from torch import nn

from engine.errors import (
    EngineError,
    UnknownArchitecture,
    WeightsError,
    check_label_count,
    first_line,
)
from engine.metadata import string_metadata
from engine.preprocessing import Preprocessing

TITLE = "ONNX"  # in messages
FAMILY = "onnx"
MODEL_TENSOR = "onnx_model"  # the serialized graph, as uint8
HEAD_KEY = "onnx_head"  # safetensors metadata: the classifier layer's description


@dataclass(frozen=True)
class OnnxHead:
    """Where the classifier layer lives in the graph."""

    features: str  # the tensor the layer reads
    weight: str  # initializer: [out, in] (Gemm with transB) or [in, out]
    bias: str | None  # initializer: [out] (or [1, out])
    transposed: bool  # the weight is stored [out, in]
    logits: str  # the tensor the layer writes


class OnnxClassifier(nn.Module):
    """An ONNX classifier as the engine runs it: images in, logits out. Only the classifier
    layer (``fc``) is a torch module; the backbone runs in onnxruntime."""

    graft_family = FAMILY

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.proto = model
        self.head = find_head(model)
        inits = {i.name: i for i in model.graph.initializer}
        weight = numpy_helper.to_array(inits[self.head.weight]).astype(np.float32)
        if self.head.transposed:
            weight = weight.T
        in_features, out_features = weight.shape
        self.fc = nn.Linear(in_features, out_features, bias=self.head.bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weight.T.copy()))
            if self.head.bias is not None:
                bias = numpy_helper.to_array(inits[self.head.bias]).reshape(-1)
                self.fc.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        self.input_name = model.graph.input[0].name
        self.channels_last = _channels_last(model)
        self.batch = fixed_batch(model)  # a graph exported for batches of one size only
        self._session: Any = None
        # what the backbone is, for the features cache (its weights are no torch parameters)
        self.register_buffer("backbone_sha256", _backbone_digest(model, self.head))

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort  # noqa: PLC0415

            graph = onnx.ModelProto()
            graph.CopyFrom(self.proto)
            graph.graph.output.append(
                helper.make_tensor_value_info(self.head.features, onnx.TensorProto.FLOAT, None)
            )
            self._session = ort.InferenceSession(
                graph.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # e.g. a Keras model's export: [N, H, W, C]
            x = x.permute(0, 2, 3, 1)
        features = run_session(
            self.session(), self.head.features, self.input_name, x.detach(), self.batch
        )
        features = features.reshape(len(x), -1).to(x.device)
        return self.fc(features.to(self.fc.weight.dtype))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def __getstate__(self) -> dict:  # an onnxruntime session does not pickle
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def to_onnx(self) -> onnx.ModelProto:
        """The original graph with this classifier layer's weights."""
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        weight = self.fc.weight.detach().cpu().numpy().astype(np.float32)
        if not self.head.transposed:
            weight = weight.T
        replace = {self.head.weight: weight}
        if self.head.bias is not None:
            old = next(i for i in model.graph.initializer if i.name == self.head.bias)
            bias = self.fc.bias.detach().cpu().numpy().astype(np.float32)
            replace[self.head.bias] = bias.reshape(1, -1) if len(old.dims) == 2 else bias
        for i, init in enumerate(model.graph.initializer):
            if init.name in replace:
                model.graph.initializer[i].CopyFrom(
                    numpy_helper.from_array(replace[init.name], init.name)
                )
        for output in model.graph.output:  # the class dimension of the output, if fixed
            dims = output.type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].HasField("dim_value"):
                dims[1].dim_value = self.fc.out_features
        del model.graph.value_info[:]  # stale shapes of the grown layer's tensors
        return model


def _backbone_digest(model: onnx.ModelProto, head: OnnxHead) -> torch.Tensor:
    """sha256 of the graph without the classifier layer's weights, as a uint8 tensor."""
    backbone = onnx.ModelProto()
    backbone.CopyFrom(model)
    keep = [i for i in backbone.graph.initializer if i.name not in (head.weight, head.bias)]
    del backbone.graph.initializer[:]
    backbone.graph.initializer.extend(keep)
    del backbone.metadata_props[:]
    digest = hashlib.sha256(backbone.SerializeToString(deterministic=True)).digest()
    return torch.tensor(list(digest), dtype=torch.uint8)


# What may stand between the logits and the output: an activation, a cast, a copy.
_AFTER_LOGITS = ("Softmax", "LogSoftmax", "Sigmoid", "Cast", "Identity")


def find_head(model: onnx.ModelProto) -> OnnxHead:
    """The layer that produces the graph's (only) output, through a final Softmax (and casts
    or copies, as some exporters add) if any."""
    graph = model.graph
    if len(graph.output) != 1 or len(graph.input) - _init_inputs(graph) != 1:
        raise EngineError("the ONNX model must have one image input and one output")
    producer = {out: node for node in graph.node for out in node.output}
    inits = {i.name for i in graph.initializer}
    logits = graph.output[0].name
    node = producer.get(logits)
    while node is not None and node.op_type in _AFTER_LOGITS:
        logits = node.input[0]
        node = producer.get(logits)
    if node is not None and node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            raise EngineError(
                "the ONNX model's final Gemm has transA/alpha/beta set; not supported"
            )
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.input[1] in inits and (bias is None or bias in inits):
            return OnnxHead(
                node.input[0], node.input[1], bias, bool(attrs.get("transB", 0)), logits
            )
    if node is not None and node.op_type == "Add":
        matmul = next((producer.get(i) for i in node.input if i not in inits), None)
        while matmul is not None and matmul.op_type in ("Cast", "Identity"):
            matmul = producer.get(matmul.input[0])
        bias = next((i for i in node.input if i in inits), None)
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
            return OnnxHead(matmul.input[0], matmul.input[1], bias, False, logits)
    found = node.op_type if node is not None else "an input"
    raise EngineError(
        f"the ONNX model's output comes from {found}; Graft grows models whose logits come from "
        "a Gemm or a MatMul+Add with constant weights (optionally followed by a Softmax)"
    )


def _init_inputs(graph: onnx.GraphProto) -> int:
    inits = {i.name for i in graph.initializer}
    return sum(1 for i in graph.input if i.name in inits)


def read_bytes(data: bytes, folder: Path | None = None) -> OnnxClassifier:
    """An ONNX model from its serialized bytes. Tensors kept in external data files are read
    from ``folder`` (the graph's own folder, as unpacked from an upload), by plain file names
    only; without a folder they are refused, saying how to send them."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 (a broken file, whatever the error)
        raise WeightsError(f"not a valid ONNX model: {first_line(exc)}") from None
    check_graph(model)
    _load_external(model, folder)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"not a valid ONNX model: {first_line(exc)}") from None
    return OnnxClassifier(prune(model)).eval()


def read_file(path: Path) -> OnnxClassifier:
    """A ``.onnx`` file, or a folder holding one ``.onnx`` file and its external data."""
    if path.is_dir():
        graphs = sorted(path.rglob("*.onnx"))
        if len(graphs) != 1:
            raise WeightsError(
                f"the archive must hold one .onnx file (and its data files); it holds {len(graphs)}"
            )
        return read_bytes(graphs[0].read_bytes(), graphs[0].parent)
    return read_bytes(path.read_bytes())


# Operator sets onnxruntime runs without custom code; any other domain needs a library of its
# own (a custom op), which Graft never loads.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), functions' bodies aside."""
    found, todo = [], [model.graph]
    while todo:
        graph = todo.pop()
        found.append(graph)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    todo.append(attr.g)
                todo.extend(attr.graphs)
    return found


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = [n for g in _graphs(model) for n in g.node]
    return nodes + [n for f in model.functions for n in f.node]


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor the model holds: initializers, sparse ones, and node attributes'."""
    found: list[onnx.TensorProto] = []
    for graph in _graphs(model):
        found.extend(graph.initializer)
        for sparse in graph.sparse_initializer:
            found += [sparse.values, sparse.indices]
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                found.append(attr.t)
            found.extend(attr.tensors)
            if attr.HasField("sparse_tensor"):
                found += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
    return found


def check_graph(model: onnx.ModelProto) -> None:
    """Refuse operators from outside the standard sets (custom ops run code Graft does not
    have; a model's own functions are fine)."""
    known = STANDARD_DOMAINS | {f.domain for f in model.functions}
    custom = sorted({f"{n.domain}::{n.op_type}" for n in _nodes(model) if n.domain not in known})
    if custom:
        raise WeightsError(
            f"the ONNX model uses operators outside the standard sets ({', '.join(custom[:5])}): "
            "custom operators need code of their own, which Graft does not load"
        )


def _load_external(model: onnx.ModelProto, folder: Path | None) -> None:
    external = [t for t in _tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    locations = sorted({e.value for t in external for e in t.external_data if e.key == "location"})
    if folder is None:
        raise WeightsError(
            f"the ONNX graph keeps its weights in a separate file ({', '.join(locations[:3])}), "
            "which was not sent: upload a .zip holding the .onnx file and its data file(s), "
            "or save one file: onnx.save(onnx.load('model.onnx'), 'one.onnx')"
        )
    for name in locations:
        if Path(name).name != name or name in ("", ".", "..") or not (folder / name).is_file():
            raise WeightsError(
                f"the ONNX graph's external data {name!r} is not a file beside it in the archive"
            )
    try:
        for tensor in external:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    except Exception as exc:  # noqa: BLE001 (offsets past the file's end, and the like)
        raise WeightsError(
            f"the ONNX graph's external data is unreadable: {first_line(exc)}"
        ) from None


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without nodes whose results reach no output (an exporter's label branch
    left behind, say): what is grown and stored is only what computes the output."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are in topological order
        if not any(o in needed for o in node.output):
            continue
        kept.append(node)
        needed.update(i for i in node.input if i)
        for attr in node.attribute:  # a subgraph may read any tensor of the outer graph
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                needed.update(i for n in sub.node for i in n.input if i)
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(kept))
        keep = [i for i in graph.initializer if i.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return model


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a graph was exported for, when its input takes no other."""
    sizes = _sizes(model)
    return sizes[0] if sizes and sizes[0] else None


def run_session(
    session: Any, output: str, input_name: str, x: torch.Tensor, batch: int | None
) -> torch.Tensor:
    """Run ``session`` on ``x`` (channels as the graph takes them), in chunks of the graph's
    fixed batch size if it has one (the last chunk padded, the padding dropped)."""
    data = x.float().cpu().numpy()
    if batch is None or len(data) == batch:
        return torch.from_numpy(session.run([output], {input_name: data})[0])
    parts = []
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        short = batch - len(chunk)
        if short:
            chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), chunk.dtype)])
        parts.append(session.run([output], {input_name: chunk})[0][: batch - short])
    return torch.from_numpy(np.concatenate(parts))


def run(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The output of an ONNX file for ``images`` (``[N, C, H, W]``), run by onnxruntime as a
    user would: the graph's own layout and batch size."""
    import onnxruntime as ort  # noqa: PLC0415

    model = onnx.load(str(path), load_external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.permute(0, 2, 3, 1) if _channels_last(model) else images
    name = model.graph.input[0].name
    return run_session(session, model.graph.output[0].name, name, x, fixed_batch(model))


def _sizes(model: onnx.ModelProto) -> list[int | None]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _channels_last(model: onnx.ModelProto) -> bool:
    """``[N, H, W, C]`` input (as Keras and TensorFlow export), not ``[N, C, H, W]``."""
    sizes = _sizes(model)
    return len(sizes) == 4 and sizes[3] in (1, 3) and sizes[1] not in (1, 3)


def preprocessing_of(model: OnnxClassifier) -> Preprocessing:
    """The input size the graph declares, ImageNet normalisation."""
    sizes = _sizes(model.proto)
    if len(sizes) != 4 or None in sizes[1:]:
        raise WeightsError(
            "the ONNX model's input is not an image batch of a fixed size: give the input "
            "size in the registration's preprocessing"
        )
    _, a, b, c = sizes
    return Preprocessing(input_size=(c, a, b) if model.channels_last else (a, b, c))


def save(path: Path, model: OnnxClassifier, metadata: Mapping[str, object]) -> None:
    data = np.frombuffer(model.to_onnx().SerializeToString(), dtype=np.uint8)
    meta = string_metadata(metadata)
    meta[HEAD_KEY] = json.dumps(asdict(model.head))
    safetensors.torch.save_file(
        {MODEL_TENSOR: torch.from_numpy(data.copy())}, str(path), metadata=meta
    )


def load(path: Path, num_labels: int) -> OnnxClassifier:
    with safetensors.safe_open(str(path), framework="pt") as f:
        if MODEL_TENSOR not in set(f.keys()):
            raise WeightsError("weights of an ONNX model must carry the graph")
        data = f.get_tensor(MODEL_TENSOR).numpy().tobytes()
    model = read_bytes(data)
    if model.fc.out_features != num_labels:
        raise WeightsError(
            f"{num_labels} labels were given but the ONNX model has {model.fc.out_features} outputs"
        )
    return model


def export(
    fmt: str,
    model: nn.Module,
    prep: Preprocessing,
    path: Path,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """The grown original graph, with Graft's description in its ``metadata_props``."""
    if not isinstance(model, OnnxClassifier):
        raise WeightsError("only ONNX models are written back as their own graph")
    proto = model.to_onnx()
    del proto.metadata_props[:]
    for key, value in string_metadata(metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


# The family protocol (engine.families.Family)
NAME = FAMILY
OWN_FORMATS = ("onnx",)  # its own graph, grown, rather than torch's export of it
NOT_OFFERED = ("torchscript",)  # the graph runs in onnxruntime, which torch.jit cannot trace


def check_name(name: str) -> None:
    """Any name: the graph is the file."""
    if not name:
        raise UnknownArchitecture(f"{FAMILY}:", [f"{FAMILY}:model"])


def read_upload(
    upload: Path, architecture: str, num_labels: int, declared: bool
) -> tuple[OnnxClassifier, Preprocessing | None]:
    model = read_file(upload)
    check_label_count(model, num_labels, TITLE)
    return model, preprocessing_of(model) if declared else None
