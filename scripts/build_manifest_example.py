"""Build the small real manifest example that ships in the package
(fedmm/data/builtin/manifest-example), the one the README documents.

Real files only: MNIST test images saved as PNG with Pillow, FSDD recordings
copied as WAV, and the FSDD speaker metadata (speakers.json) as the text column.
Three speakers are three sites; FSDD's test recordings (index 0-1 here) are
split=test. Every 7th training row has its audio cell left empty and every 11th
its image cell, to show missing modalities. Pairing image and recording by
digit follows fedmm.data.avmnist.

Usage: python scripts/build_manifest_example.py [--source ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from fedmm.data.idx import read_idx
from fedmm.data.manifest import write_manifest

SPEAKERS = ("george", "jackson", "theo")
TEST, TRAIN = (0, 1), (5, 6, 7, 8)

SOURCE_MD = """# Manifest example

Built by `scripts/build_manifest_example.py`; do not edit by hand. {rows} rows, 3 sites.

- `audio/*.wav`: recordings of the Free Spoken Digit Dataset (FSDD), Z. Jackson et al.,
  https://github.com/Jakobovski/free-spoken-digit-dataset (commit 26eb9aa), CC BY-SA 4.0,
  copied unchanged.
- `images/*.png`: MNIST test-split images (Y. LeCun and C. Cortes, CC BY-SA 3.0) saved as PNG.
- `text`: FSDD's speaker metadata (speakers.json). `tabular:duration_s`: each recording's length.

Some cells are left empty on purpose, to show missing modalities.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "fedmm" / "data" / "builtin" / "manifest-example")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    (args.dest / "images").mkdir(parents=True)
    (args.dest / "audio").mkdir()
    images = read_idx(args.source / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "mnist" / "t10k-labels-idx1-ubyte.gz")
    speakers = json.loads((args.source / "fsdd" / "speakers.json").read_text())
    rows = []
    for digit in range(10):
        pool = iter(np.flatnonzero(labels == digit))
        for speaker in SPEAKERS:
            for index in (*TEST, *TRAIN):
                stem = f"{digit}_{speaker}_{index}"
                wav = args.source / "fsdd" / "recordings" / f"{stem}.wav"
                shutil.copyfile(wav, args.dest / "audio" / wav.name)
                row_id = next(pool)
                Image.fromarray(images[row_id]).save(args.dest / "images" / f"mnist-{row_id}.png", optimize=True)
                meta = speakers[speaker]
                n = len(rows)
                train = index in TRAIN
                rows.append({
                    "image": "" if train and n % 11 == 3 else f"images/mnist-{row_id}.png",
                    "audio": "" if train and n % 7 == 2 else f"audio/{wav.name}",
                    "text": f"{meta['gender']} speaker, accent {meta['accent']}, language {meta['language']}",
                    "tabular:duration_s": f"{sf.info(wav).duration:.4f}",
                    "label": str(digit),
                    "site": speaker,
                    "split": "train" if train else "test",
                })
    write_manifest(args.dest / "manifest.csv", rows)
    (args.dest / "SOURCE.md").write_text(SOURCE_MD.format(rows=len(rows)))
    print(f"wrote {len(rows)} rows to {args.dest}")


if __name__ == "__main__":
    main()
