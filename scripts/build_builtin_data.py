"""Build the AV-MNIST subset that ships inside the package (fedmm/data/builtin/avmnist).

Sources (both openly licensed, read from a folder laid out like shared/data):
- Free Spoken Digit Dataset (FSDD), Z. Jackson et al., CC BY-SA 4.0,
  github.com/Jakobovski/free-spoken-digit-dataset (commit 26eb9aa).
- MNIST test split, Y. LeCun and C. Cortes, CC BY-SA 3.0.

What it keeps: FSDD recordings with index 0-29 of every speaker and digit
(0-4 are FSDD's official test split; 5-29 train), re-encoded as lossless FLAC
(the samples are bit-identical to the WAV files), and, per digit, the first
300 MNIST test images in their original order (an IDX file, like the original),
so the pairing rule of fedmm.data.avmnist picks the same images as on the full
data. Usage: python scripts/build_builtin_data.py [--source ../shared/data]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from fedmm.data.idx import read_idx, write_idx

MAX_INDEX = 30
IMAGES_PER_DIGIT = 300

SOURCE_MD = """# Built-in AV-MNIST subset

Built by `scripts/build_builtin_data.py` from the original files; do not edit by hand.

- `fsdd/recordings/`: {n_rec} recordings of the Free Spoken Digit Dataset (FSDD),
  Z. Jackson, C. Souza, J. Flaks, Y. Pan, H. Nicolas, A. Thite,
  https://github.com/Jakobovski/free-spoken-digit-dataset (commit 26eb9aa),
  licence CC BY-SA 4.0. Indices 0-{max_index} of each speaker and digit, re-encoded from
  8 kHz 16-bit WAV to lossless FLAC (identical samples).
- `mnist/`: {n_img} images of the MNIST test split (the first {per_digit} of each digit, in
  file order, same IDX format), Y. LeCun and C. Cortes, licence CC BY-SA 3.0.

This subset is shared under CC BY-SA 4.0 (the code of fedmm is Apache-2.0).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "fedmm" / "data" / "builtin" / "avmnist")
    args = parser.parse_args()

    if args.dest.exists():
        shutil.rmtree(args.dest)
    rec_out = args.dest / "fsdd" / "recordings"
    rec_out.mkdir(parents=True)
    n_rec = 0
    for wav in sorted((args.source / "fsdd" / "recordings").glob("*.wav")):
        digit, speaker, index = wav.stem.split("_")
        if int(index) < MAX_INDEX:
            samples, rate = sf.read(wav, dtype="int16")
            sf.write(rec_out / f"{wav.stem}.flac", samples, rate, format="FLAC", subtype="PCM_16")
            n_rec += 1

    images = read_idx(args.source / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "mnist" / "t10k-labels-idx1-ubyte.gz")
    keep = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        keep[np.flatnonzero(labels == digit)[:IMAGES_PER_DIGIT]] = True
    (args.dest / "mnist").mkdir()
    write_idx(args.dest / "mnist" / "t10k-images-idx3-ubyte.gz", images[keep])
    write_idx(args.dest / "mnist" / "t10k-labels-idx1-ubyte.gz", labels[keep])
    (args.dest / "SOURCE.md").write_text(
        SOURCE_MD.format(n_rec=n_rec, max_index=MAX_INDEX - 1, n_img=int(keep.sum()), per_digit=IMAGES_PER_DIGIT)
    )
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"wrote {n_rec} recordings and {int(keep.sum())} images to {args.dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
