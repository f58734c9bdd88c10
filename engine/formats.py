"""The files a version may have, by format, and the suffix that names each (the stored object
and the downloaded file). Safetensors always; ONNX and TorchScript where they reproduce the
model; ``hf`` (a Hugging Face model's own folder, zipped) and ``keras`` (a ``.keras`` file)
for models of those families. No heavy imports: clients read this too."""

from __future__ import annotations

SAFETENSORS = "safetensors"
SUFFIXES: dict[str, str] = {
    "safetensors": ".safetensors",
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "hf": ".hf.zip",
    "keras": ".keras",
}
