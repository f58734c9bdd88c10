"""Quick predictions with a stored version, for trying it out over HTTP."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image, UnidentifiedImageError

from app.archives import ALLOWED_DECODERS
from app.schemas import Prediction
from core.errors import Conflict, Invalid, ServiceError
from core.models import ModelVersion
from core.storage import Storage
from engine.data import eval_transform
from engine.errors import named, resource_error
from engine.formats import SAFETENSORS
from engine.preprocessing import Preprocessing
from engine.weights import load_classifier


@contextmanager
def cannot_run(name: str) -> Iterator[None]:
    """A stored model that fails to load or run is a 409 that says why, never a 500; running
    out of memory stays what it is."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ServiceError) or resource_error(exc) is not None:
            raise
        raise Conflict(f"{name} cannot run here: {named(exc)}") from None


class Predictor:
    def __init__(self, version: ModelVersion, storage: Storage) -> None:
        weights = storage.local_path(version.artifacts[SAFETENSORS]["key"])
        self.name = f"version {version.version}"
        with cannot_run(self.name):
            self.model, _ = load_classifier(version.architecture, len(version.labels), weights)
        self.labels = list(version.labels)
        self.prep = Preprocessing.from_dict(version.preprocessing)
        self.transform = eval_transform(self.prep)
        self.mode = "RGB" if self.prep.input_size[0] == 3 else "L"
        self.lock = threading.Lock()

    def _tensor(self, i: int, data: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_DECODERS) as im:
                return self.transform(im.convert(self.mode))
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as exc:
            raise Invalid(f"image {i} is not a decodable image ({exc})", "image") from None

    def predict(self, images: list[bytes], top_k: int) -> list[list[Prediction]]:
        batch = torch.stack([self._tensor(i, data) for i, data in enumerate(images)])
        with self.lock, torch.inference_mode(), cannot_run(self.name):
            probabilities = self.model(batch).float().softmax(dim=1)
        k = min(top_k, len(self.labels))
        scores, indices = probabilities.topk(k, dim=1)
        return [
            [
                Prediction(label=self.labels[j], score=round(s, 6))
                for s, j in zip(row_s.tolist(), row_i.tolist(), strict=True)
            ]
            for row_s, row_i in zip(scores, indices, strict=True)
        ]


class PredictorCache:
    """The few most recently used versions, loaded once each."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: ModelVersion, storage: Storage) -> Predictor:
        with self._lock:
            if version.id in self._items:
                self._items.move_to_end(version.id)
                return self._items[version.id]
        predictor = Predictor(version, storage)
        with self._lock:
            self._items[version.id] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return predictor
