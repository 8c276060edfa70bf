#!/usr/bin/env python
"""Peak memory of a batch of large images on the evaluation path of the training script (`ImageTransform`, then
`DevicePreprocessor`): images reduced while decoded (for the model's `image_size`) against decoded at their source
size.

    python benchmarks/decode_memory.py                          # 8 PNGs of 7,000 x 7,000 (49 MP), batch 4, 32 px
    python benchmarks/decode_memory.py --side 3000 --images 8   # a smaller setting (seconds)

The PNGs are one colour each (a few KB on disk, as a decompression bomb is). Each setting runs in its own process,
which reports its peak resident memory (`ru_maxrss`) above what it held before the first batch. Prints one table
line per setting, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from measuring import peak_rss_mb

PROJECT_DIR = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, side: int) -> list[str]:
    """`count` one-colour RGB PNGs of `side` x `side` in `folder`; their paths."""
    import PIL.Image

    paths = []
    for index in range(count):
        path = folder / f"large-{index}.png"
        PIL.Image.new("RGB", (side, side), (index * 29 % 256, 90, 200)).save(path, optimize=False, compress_level=1)
        paths.append(str(path))
    return paths


def measure_batches(paths: list[str], batch_size: int, image_size: int, reduce: bool) -> dict[str, float]:
    """In this process: decode `paths` in batches as evaluation does and turn each batch into model inputs; the peak
    resident memory above the start (MiB) and the largest decoded image (pixels)."""
    sys.path.insert(0, str(PROJECT_DIR))
    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from hierarchical.data.collation import ImageTransform
    from hierarchical.data.device_preprocess import DevicePreprocessor

    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    transform = ImageTransform(split="test", max_image_pixels=None, image_size=image_size if reduce else None)
    preprocess = DevicePreprocessor(config)
    start = peak_rss_mb()
    largest = 0
    for first in range(0, len(paths), batch_size):
        rows = list(range(first, min(first + batch_size, len(paths))))
        batch = transform({"image": [{"bytes": None, "path": paths[row]} for row in rows], "index": rows})
        largest = max(largest, *(image.shape[-1] * image.shape[-2] for image in batch["pixel_values"]))
        preprocess.model_input(batch["pixel_values"], {})
        del batch
    return {"peak_mb": peak_rss_mb() - start, "largest_decoded_pixels": largest}


def measure_in_child(paths: list[str], batch_size: int, image_size: int, reduce: bool) -> dict[str, float]:
    """`measure_batches` in a fresh process, so its peak memory is its own."""
    script = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from decode_memory import "
        f"measure_batches; print(json.dumps(measure_batches({paths!r}, {batch_size}, {image_size}, {reduce})))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the decode-memory measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_decode_memory(images: int, side: int, batch_size: int, image_size: int) -> dict[str, Any]:
    """Peak memory (MiB) of `images` PNGs of `side` x `side` in batches of `batch_size`, reduced and not."""
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), images, side)
        reduced = measure_in_child(paths, batch_size, image_size, reduce=True)
        source_size = measure_in_child(paths, batch_size, image_size, reduce=False)
    return {
        "images": images,
        "side": side,
        "batch_size": batch_size,
        "image_size": image_size,
        "reduced_peak_mb": round(reduced["peak_mb"], 1),
        "reduced_largest_pixels": reduced["largest_decoded_pixels"],
        "source_size_peak_mb": round(source_size["peak_mb"], 1),
        "source_size_largest_pixels": source_size["largest_decoded_pixels"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="How many large PNGs.")
    parser.add_argument("--side", type=int, default=7000, help="Their width and height in pixels.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per batch.")
    parser.add_argument("--image_size", type=int, default=32, help="The model's image size.")
    args = parser.parse_args(argv)
    results = measure_decode_memory(args.images, args.side, args.batch_size, args.image_size)
    megapixels = args.side * args.side / 1e6
    print(
        f"| {args.images} PNGs of {megapixels:.0f} MP, batch {args.batch_size}, {args.image_size} px | peak above start |"
    )
    print("| --- | --- |")
    print(f"| reduced while decoded | {results['reduced_peak_mb']:,.0f} MiB |")
    print(f"| decoded at the source size | {results['source_size_peak_mb']:,.0f} MiB |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
