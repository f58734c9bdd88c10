"""Where the engine runs and in what precision, and what a GPU needs around it.

* ``autocast_dtype``: the dtype the backbone runs in, a pure function of the device type, its
  compute capability and the ``precision`` setting: bf16 on GPUs of capability 8.0 (Ampere) and
  later, fp16 below it (``torch.cuda.is_bf16_supported()`` is true there too, by emulation, at a
  fraction of the speed), float32 (no autocast) on CPUs or when asked for; bf16 on a CPU only
  when asked for and its matrix units take bf16 (``cpu_has_bf16``).
* ``float32_head``: whatever the backbone runs in, the classifier layer sees float32 features
  and runs in float32, outside autocast: the layer that is measured and calibrated is the one
  exported.
* ``halving_on_oom``: a step that runs out of GPU memory is tried once more at half its batch
  size, then fails as ``out_of_memory`` naming the setting to lower.
* ``release_memory``: what a job held on the GPU goes back to the driver when it ends (the
  worker is long-lived).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from engine.errors import OutOfMemory
from engine.families import family_of
from engine.heads import Head

log = logging.getLogger(__name__)
T = TypeVar("T")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEFAULT_PRECISION = "auto"
BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; earlier GPUs only emulate bf16
_NAMED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {dtype: name for name, dtype in _NAMED.items()}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU operations in one thread for a while (the thread count is the
    process's; a worker runs one job at a time), then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(preference: str = "auto") -> torch.device:
    """``cuda`` when available (``auto``), else the device asked for."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def autocast_dtype(
    device_type: str,
    capability: tuple[int, int] | None,
    precision: str = DEFAULT_PRECISION,
    native_bf16: bool = False,
) -> torch.dtype:
    """The dtype the backbone runs in; ``torch.float32`` means no autocast.

    On a GPU: ``fp32``, ``bf16`` and ``fp16`` are taken as said; ``auto`` is bf16 from compute
    capability 8.0 on and fp16 below it (which needs a gradient scaler wherever it trains, see
    ``grad_scaler``). On a CPU it is float32, but for ``bf16`` on a CPU with ``native_bf16``
    (AMX or AVX512-BF16 matrix units, through oneDNN: the backbone 1.8-2.9x faster,
    bench/RESULTS.md); ``auto`` keeps float32 there, so a CPU's figures stay those of the exported
    file bit for bit unless bf16 is asked for.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device_type != "cuda":
        cpu_bf16 = device_type == "cpu" and precision == "bf16" and native_bf16
        return torch.bfloat16 if cpu_bf16 else torch.float32
    if precision != "auto":
        return _NAMED[precision]
    if capability is None:
        raise ValueError("a CUDA device needs its compute capability to choose a precision")
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float16


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16), with
    oneDNN to use them."""
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # a torch without the probes
        return False
    return bool(native) and torch.backends.mkldnn.is_available()


def compute_dtype(device: torch.device, precision: str = DEFAULT_PRECISION) -> torch.dtype:
    """``autocast_dtype`` for a real device (its capability read from the driver)."""
    if device.type == "cuda":
        return autocast_dtype("cuda", torch.cuda.get_device_capability(device), precision)
    return autocast_dtype(device.type, None, precision, native_bf16=cpu_has_bf16())


def backbone_dtype(dtype: torch.dtype, device: torch.device, model: nn.Module) -> torch.dtype:
    """``dtype`` for ``model``'s backbone on ``device``: on a CPU, bf16 is for timm and
    torchvision backbones only (an ONNX graph runs in onnxruntime, in float32 whatever torch
    autocasts; Keras and Hugging Face models are not checked in bf16 on a CPU)."""
    if device.type == "cpu" and family_of(model) is not None:
        return torch.float32
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16`` or ``fp32``."""
    return _NAMES[dtype]


def autocast_for(
    device: torch.device, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (default: the ``auto`` choice) on a GPU, or to bf16 on a CPU;
    nothing for float32 (or on other devices)."""
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    dtype = compute_dtype(device) if dtype is None else dtype
    if dtype == torch.float32 or (device.type == "cpu" and dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_scaling(device_type: str, dtype: torch.dtype) -> bool:
    """Whether training steps need a loss scaler: only under fp16 autocast on a GPU (fp16
    gradients underflow without one; bf16 has float32's range and needs none)."""
    return device_type == "cuda" and dtype == torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A ``GradScaler``, enabled where ``loss_scaling`` says (disabled, it changes nothing)."""
    return torch.amp.GradScaler(device.type, enabled=loss_scaling(device.type, dtype))


class _Float32Layer(nn.Module):
    """Runs ``layer`` in float32 on float32 inputs, outside any autocast."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())

    def __getattr__(self, name: str) -> object:  # a model that reads ``fc.weight`` still can
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


@contextlib.contextmanager
def float32_head(model: nn.Module, head: Head) -> Iterator[None]:
    """While inside, ``model``'s classifier layer gets its features cast to float32 and runs
    in float32 outside autocast (the backbone may still run in bf16/fp16), so logits, losses
    and predictions are those of the float32 layer that is exported. ``head.module`` is the
    same object throughout (hooks on it, optimisers of its parameters, still apply)."""
    model.set_submodule(head.path, _Float32Layer(head.module))
    try:
        yield
    finally:
        model.set_submodule(head.path, head.module)


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU allocation that failed: ``torch.OutOfMemoryError``, or the cuBLAS/CUDA errors
    that say the same in other words."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text
        or "CUDA error: out of memory" in text
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def release_memory(device: torch.device) -> None:
    """Hand what the GPU's caching allocator keeps back to the driver, once nothing refers to
    it (a long-lived worker would otherwise hold a job's peak for the next job)."""
    if device.type != "cuda":
        return
    gc.collect()
    torch.cuda.empty_cache()


def halving_on_oom(
    step: Callable[[int], T],
    batch_size: int,
    doing: str,
    lower: str,
    device: torch.device,
    on_retry: Callable[[int], None] | None = None,
) -> tuple[T, int]:
    """``(step(size), size)``: ``step`` at ``batch_size``; out of GPU memory, once more at half
    of it (``on_retry(half)`` first; the failed attempt's memory is released in between). Out of
    memory again: :class:`OutOfMemory`, saying what was being done (``doing``) and the setting
    to lower (``lower``)."""
    sizes = [batch_size] + ([batch_size // 2] if batch_size > 1 else [])
    reason = ""
    for tried, size in enumerate(sizes):
        if tried:
            log.warning("out of GPU memory %s at batch size %d; trying %d", doing, sizes[0], size)
            if on_retry is not None:
                on_retry(size)
        try:
            return step(size), size
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "OOM"
            # the failed attempt's frames hold its tensors: drop them before trying again
            traceback.clear_frames(exc.__traceback__)
        release_memory(device)
    tried_sizes = " and again at ".join(str(s) for s in sizes)
    raise OutOfMemory(
        f"the GPU ran out of memory {doing} at batch size {tried_sizes} ({reason}). Lower "
        f"{lower} (now {batch_size}), or run the job on a worker with a larger GPU"
    )
