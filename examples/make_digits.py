"""Make a model and a dataset to try Graft with, from scikit-learn's handwritten digits.

    .venv/bin/python examples/make_digits.py var/example

writes, in about 15 seconds on a laptop CPU:
  digits-0-8.safetensors   a resnet18 trained from scratch on the digits 0-8
  labels.json              its labels, one per output unit
  preprocessing.json       how its inputs were prepared (32x32 RGB, mean/std 0.5)
  digits.zip               an ImageFolder archive: 60 images of each known digit, 15 of "9"
  reference.zip            20 other images of each known digit: a reference set for the model
  nines.zip                the 15 images of "9" alone: what a user with only new images has
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import digits as D  # noqa: E402


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base, held = D.load()
    print("training a resnet18 on digits 0-8 ...", flush=True)
    model = D.train_base(base, list(range(9)))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "digits-0-8.safetensors"),
    )
    (out / "labels.json").write_text(json.dumps([str(d) for d in range(9)]))
    (out / "preprocessing.json").write_text(json.dumps(D.PREP.to_dict()))
    folders = {str(d): held.of(d)[:60] for d in range(9)} | {"9": held.of(9)[:15]}
    (out / "digits.zip").write_bytes(D.zip_image_folder(folders))
    reference = {str(d): held.of(d)[60:80] for d in range(9)}
    (out / "reference.zip").write_bytes(D.zip_image_folder(reference))
    (out / "nines.zip").write_bytes(D.zip_image_folder({"9": held.of(9)[:15]}))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "var/example"))
