"""The model outside PyTorch: export a saved hierarchical model to ONNX (`model.onnx` beside it, outputs `logits` and
`coarse_logits`, dynamic batch), check the export against PyTorch, and predict with ONNX Runtime.

The ONNX packages are optional extras (`requirements-onnx.txt`): they are imported only where they are used, and a
missing one is named together with the command that installs them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import AutoImageProcessor
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.data.decoding import to_rgb
from hierarchical.data.hierarchy_files import IMAGE_EXTENSIONS
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor
from prediction_hierarchical import HierarchicalPrediction

logger = logging.get_logger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "coarse_logits")
INSTALL_COMMAND = "pip install -r requirements-onnx.txt"
DEFAULT_ATOL = 1e-4  # largest absolute difference of any logit between ONNX Runtime and PyTorch (fp32)
DEFAULT_CHECK_IMAGES = 16
CHECK_SEED = 0


def import_extra(name: str) -> ModuleType:
    """Import the optional package `name` (`onnx`, `onnxruntime`, `onnxscript`); `ImportError` naming the package and
    the command that installs the ONNX extras when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"the ONNX export and ONNX Runtime predictions need the optional package {name!r}, which is not "
            f"installed ({error}); install the ONNX extras with: {INSTALL_COMMAND}"
        ) from error


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


class _BothHeads(nn.Module):
    """The model's forward as ONNX sees it: normalised images in, the two heads' logits out."""

    def __init__(self, model: HierarchicalEfficientNetV2ForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, coarse_logits = self.model(pixel_values, return_dict=False)
        return logits, coarse_logits  # (batch, num_labels), (batch, num_coarse_labels)


def export_onnx(model: HierarchicalEfficientNetV2ForImageClassification, path: str | os.PathLike) -> Path:
    """Write the eval-mode forward of `model` to the ONNX file `path` with `torch.onnx.export` (the `torch.export`
    based exporter): input `pixel_values` `(batch, 3, image_size, image_size)`, outputs `logits`
    `(batch, num_labels)` and `coarse_logits` `(batch, num_coarse_labels)`, the batch size free. Returns `path`."""
    for name in ("onnx", "onnxscript"):
        import_extra(name)
    size = model.config.image_size
    example = torch.zeros(2, model.config.num_channels, size, size)  # (batch, 3, height, width)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            _BothHeads(model).eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    finally:
        model.train(was_training)
    program.save(os.fspath(path))
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Predictions with ONNX Runtime
# ----------------------------------------------------------------------------------------------------------------


def load_image_processor(model_dir: str | os.PathLike, config: HierarchicalEfficientNetV2Config) -> Any:
    """The image processor saved in `model_dir` (as the pipeline loads it); the one `build_image_processor` makes for
    `config` when the folder has none."""
    if os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(model_dir)
    logger.warning("%s has no preprocessor_config.json: using the image processor of its config", model_dir)
    return build_image_processor(config)


class OnnxHierarchicalClassifier:
    r"""
    Hierarchical predictions of an exported model: the image processor prepares the images, ONNX Runtime runs the
    forward pass (no torch), and the two heads' logits go through the model's own rule (`predict_from_logits`: the
    stored temperatures, the consistent distribution and the selective answers at `config.selective_threshold`).

    Args:
        session (`onnxruntime.InferenceSession`): the session of the exported `model.onnx`.
        config (`HierarchicalEfficientNetV2Config`): the saved model's config (classes, temperatures, threshold).
        image_processor: the saved model's image processor.

    Example:

    >>> classifier = OnnxHierarchicalClassifier.from_pretrained("outputs/model")  # doctest: +SKIP
    >>> prediction = classifier([PIL.Image.open("photo.png")])  # doctest: +SKIP
    >>> prediction.fine_labels, prediction.coarse_labels, prediction.answer_labels  # doctest: +SKIP
    (['maple_tree'], ['trees'], ['trees'])
    """

    def __init__(self, session: Any, config: HierarchicalEfficientNetV2Config, image_processor: Any):
        self.session = session
        self.config = config
        self.image_processor = image_processor
        self.fine_to_coarse = config.fine_to_coarse_tensor()  # read by predict_from_logits

    @classmethod
    def from_pretrained(
        cls, model_dir: str | os.PathLike, onnx_file: str = ONNX_FILE, threads: int | None = None
    ) -> OnnxHierarchicalClassifier:
        """Load `model_dir/onnx_file` (written by `python -m hierarchical.export_onnx`) on ONNX Runtime's CPU provider
        (with `threads` intra-op threads, ONNX Runtime's choice when None), with the folder's config and image
        processor."""
        onnx_path = os.path.join(model_dir, onnx_file)
        if not os.path.isfile(onnx_path):
            raise ValueError(
                f"{onnx_path!r} does not exist: write it with python -m hierarchical.export_onnx {model_dir}"
            )
        config = HierarchicalEfficientNetV2Config.from_pretrained(model_dir)
        return cls(onnx_session(onnx_path, threads), config, load_image_processor(model_dir, config))

    def logits(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two heads' logits `(batch, num_labels)`, `(batch, num_coarse_labels)` for normalised float32 images
        `(batch, 3, image_size, image_size)`."""
        logits, coarse_logits = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixel_values.astype(np.float32)})
        return logits, coarse_logits

    def __call__(
        self, images: Sequence[PIL.Image.Image], consistent: bool = True, min_confidence: float | None = None
    ) -> HierarchicalPrediction:
        """Predict class, superclass and (with a threshold) the selective answer of every image, as the model's
        `predict_hierarchical` does on the same images."""
        pixel_values = self.image_processor(images=list(images), return_tensors="np")["pixel_values"]
        logits, coarse_logits = self.logits(pixel_values)
        return self.predict_from_logits(
            torch.from_numpy(logits), torch.from_numpy(coarse_logits), consistent, min_confidence
        )

    # the model's rule from logits to predictions, which reads only `config` and `fine_to_coarse`
    predict_from_logits = HierarchicalEfficientNetV2ForImageClassification.predict_from_logits


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime session of the ONNX file `path` on the CPU, with `threads` intra-op threads (ONNX Runtime's
    choice when None)."""
    onnxruntime = import_extra("onnxruntime")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------------
# Check against PyTorch
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OnnxCheck:
    """How ONNX Runtime's outputs compare with PyTorch's on the same images.

    Args:
        num_images (`int`): images compared.
        max_abs_diff (`float`): largest absolute difference of any logit of either head.
        atol (`float`): the largest difference accepted.
        agreements (`dict[str, int]`): per answer (`"class"`, `"superclass"`, `"selective answer"`), the images on
            which both give the same one.
        threshold (`float`, *optional*): the selective threshold the answers were compared at.
    """

    num_images: int
    max_abs_diff: float
    atol: float
    agreements: dict[str, int] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def passed(self) -> bool:
        """Logits within `atol` and every answer the same."""
        return self.max_abs_diff <= self.atol and all(n == self.num_images for n in self.agreements.values())

    def lines(self) -> list[str]:
        """The check as lines of text."""
        answers = "; ".join(f"{name}: {n}/{self.num_images} agree" for name, n in self.agreements.items())
        threshold = "no stored selective threshold" if self.threshold is None else f"threshold {self.threshold:.4g}"
        return [
            f"  logits: max abs difference {self.max_abs_diff:.2e} (tolerance {self.atol:.0e})",
            f"  {answers} ({threshold})",
        ]


def check_onnx_model(
    model: HierarchicalEfficientNetV2ForImageClassification,
    classifier: OnnxHierarchicalClassifier,
    pixel_values: torch.Tensor,
    atol: float = DEFAULT_ATOL,
) -> OnnxCheck:
    """Run `model` (eval mode, under no_grad) and `classifier`'s ONNX model on the same normalised images and compare
    the logits and the class, superclass and selective answers with the stored temperatures and threshold."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(pixel_values)
    finally:
        model.train(was_training)
    logits, coarse_logits = classifier.logits(pixel_values.numpy())
    max_abs_diff = max(
        float(np.abs(logits - expected.logits.numpy()).max()),
        float(np.abs(coarse_logits - expected.coarse_logits.numpy()).max()),
    )
    torch_answers = model.predict_from_logits(expected.logits, expected.coarse_logits)
    onnx_answers = classifier.predict_from_logits(torch.from_numpy(logits), torch.from_numpy(coarse_logits))
    agreements = {
        "class": int((torch_answers.fine_ids == onnx_answers.fine_ids).sum()),
        "superclass": int((torch_answers.coarse_ids == onnx_answers.coarse_ids).sum()),
    }
    if torch_answers.answer_levels is not None:
        agreements["selective answer"] = sum(
            a == b
            for a, b in zip(
                zip(torch_answers.answer_levels, torch_answers.answer_ids.tolist(), strict=True),
                zip(onnx_answers.answer_levels, onnx_answers.answer_ids.tolist(), strict=True),
                strict=True,
            )
        )
    return OnnxCheck(len(pixel_values), max_abs_diff, atol, agreements, torch_answers.min_confidence)


def image_files(paths: Sequence[str]) -> list[str]:
    """The image files among `paths` and below the folders among them (sorted, by extension); `ValueError` naming a
    path that does not exist, or saying that none holds an image."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for folder, subfolders, names in os.walk(path):
                subfolders.sort()
                files.extend(
                    os.path.join(folder, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)
                )
        else:
            raise ValueError(f"--images {path!r} does not exist")
    if not files:
        raise ValueError(f"--images {' '.join(paths)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path: str) -> PIL.Image.Image:
    """The RGB image in the file `path`; `ValueError` naming the file when it cannot be decoded."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(f"--images: could not read the image {path!r}: {type(error).__name__}: {error}") from None


def check_images(paths: Sequence[str], count: int, image_size: int) -> tuple[list[PIL.Image.Image], str]:
    """`count` images to check an export on, and where they come from: evenly spread over the image files of `paths`,
    or, without paths, generated ones (random pixels, seeded)."""
    if not paths:
        rng = np.random.default_rng(CHECK_SEED)
        images = [
            PIL.Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(count)
        ]
        return images, f"{count} generated images (random pixels; pass --images to check on real ones)"
    files = image_files(paths)
    chosen = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(count, len(files)))})
    return [read_image(files[i]) for i in chosen], f"{len(chosen)} images of {len(files)} from --images"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m hierarchical.export_onnx`."""
    parser = argparse.ArgumentParser(
        prog="python -m hierarchical.export_onnx",
        description=f"Write MODEL_DIR/{ONNX_FILE} (outputs logits and coarse_logits, dynamic batch) from a model saved "
        "by run_classification.py, then check it: ONNX Runtime and PyTorch on the same images give logits within "
        f"--atol and the same class, superclass and selective answers. Needs the ONNX extras ({INSTALL_COMMAND}).",
        allow_abbrev=False,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="Folder of a saved model (config.json, weights).")
    parser.add_argument(
        "--images",
        nargs="+",
        default=[],
        help="Image files or folders (searched recursively) to check the export on; generated images without it.",
    )
    parser.add_argument(
        "--num_images", type=int, default=DEFAULT_CHECK_IMAGES, help="How many images the check uses (one batch)."
    )
    parser.add_argument(
        "--atol", type=float, default=DEFAULT_ATOL, help="Largest accepted absolute difference of a logit."
    )
    return parser


def load_model(model_dir: str) -> HierarchicalEfficientNetV2ForImageClassification:
    """The saved model in the folder `model_dir`, in eval mode; `ValueError` naming the folder when it holds none."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"MODEL_DIR {model_dir!r} is not a folder")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"MODEL_DIR {model_dir!r} is not a saved model: it has no config.json")
    try:
        return HierarchicalEfficientNetV2ForImageClassification.from_pretrained(model_dir).eval()
    except OSError as error:
        raise ValueError(f"could not load the model in {model_dir!r}: {str(error).splitlines()[0]}") from error


def main(argv: Sequence[str] | None = None) -> OnnxCheck:
    """Export MODEL_DIR to ONNX, check it, print what was written and how it compares; returns the check."""
    args = build_parser().parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num_images must be >= 1, got {args.num_images}")
    if not args.atol >= 0:
        raise ValueError(f"--atol must be a number >= 0, got {args.atol}")
    for name in ("onnx", "onnxscript", "onnxruntime"):  # before the minutes of an export
        import_extra(name)
    model = load_model(args.model_dir)
    images, source = check_images(args.images, args.num_images, model.config.image_size)
    onnx_path = export_onnx(model, os.path.join(args.model_dir, ONNX_FILE))
    size_mb = os.path.getsize(onnx_path) / 2**20
    print(f"Wrote {onnx_path} ({size_mb:.1f} MiB): input {INPUT_NAME} (batch, 3, H, W), outputs logits, coarse_logits.")
    classifier = OnnxHierarchicalClassifier.from_pretrained(args.model_dir)
    pixel_values = classifier.image_processor(images=images, return_tensors="pt")["pixel_values"]
    check = check_onnx_model(model, classifier, pixel_values, args.atol)
    print(f"ONNX Runtime against PyTorch on {source}:")
    print("\n".join(check.lines()))
    return check


def cli(argv: Sequence[str] | None = None) -> None:
    """`main` for the command line: a bad input or a missing extra ends with one `error:` line on stderr and exit
    status 2; an export that differs from PyTorch with an `error:` line and exit status 1."""
    logging.disable_progress_bar()  # stderr keeps only what the user must read
    try:
        check = main(argv)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if not check.passed:
        print(
            f"error: the ONNX model differs from PyTorch beyond the tolerance or in its answers (see above); "
            f"{ONNX_FILE} was written but should not be served",
            file=sys.stderr,
        )
        raise SystemExit(1)


__all__ = [
    "ONNX_FILE",
    "OnnxCheck",
    "OnnxHierarchicalClassifier",
    "check_onnx_model",
    "export_onnx",
    "import_extra",
    "main",
]
