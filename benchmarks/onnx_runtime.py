#!/usr/bin/env python
"""ONNX Runtime against PyTorch eager on the CPU: images/s at batch 1 and 64 at a recipe's image size, and an int8
dynamic-quantised ONNX model (`onnxruntime.quantization.quantize_dynamic`) with its accuracy change.

    pip install -r requirements-onnx.txt
    python benchmarks/onnx_runtime.py                                  # random weights, 32 px, generated images
    python benchmarks/onnx_runtime.py --images my_photos/              # int8 agreement on your images
    python benchmarks/onnx_runtime.py --model_dir outputs/model --dataset_name DATA   # accuracy on held-out images
    python benchmarks/onnx_runtime.py --recipe recipes/gpu_imagenet_384px.json --timed_images 64

Speed does not depend on the weights, so without `--model_dir` a random-weight model (seed 42) is timed. Accuracy
does: with a trained `--model_dir` and a labelled `--dataset_name`, the table gives the class and superclass accuracy
of the fp32 and int8 ONNX models on held-out images (the validation split, else the test split); without them it
gives how often the int8 model's answers agree with the fp32 model's, which is agreement, not accuracy. Every speed is
the best of `--repeats` alternating runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from measuring import REPO_ROOT, SEED, busy_cpu_seconds, check_at_least, other_cpu_share
from throughput import prepare_splits, timed_runs

BATCH_SIZES = (1, 64)
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "cpu_32px_30min.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="Recipe whose image_size is measured.")
    parser.add_argument("--model_dir", default=None, help="A saved (trained) model; random weights without it.")
    parser.add_argument(
        "--dataset_name",
        default=None,
        help="Labelled images in a format run_classification.py reads (its validation, else test split); generated "
        "images without it.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=[],
        help="Image files or folders (searched recursively) for the agreement of int8 with fp32, without labels.",
    )
    parser.add_argument("--eval_images", type=int, default=256, help="Images for accuracy or agreement.")
    parser.add_argument("--timed_images", type=int, default=128, help="Images per timed run at batch 64.")
    parser.add_argument("--timed_single_images", type=int, default=16, help="Images per timed run at batch 1.")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating runs of every measurement.")
    parser.add_argument("--threads", type=int, default=None, help="Threads of torch and ONNX Runtime (their default).")
    args = parser.parse_args(argv)
    check_at_least(args, 1, ("eval_images", "timed_images", "timed_single_images", "repeats"))
    return args


def load_or_build_model(args: argparse.Namespace, folder: Path):
    """The model of `--model_dir`, else a random one at the recipe's image size, saved with its image processor to
    `folder`; with a note on its weights for the table."""
    from hierarchical.training.onnx_export import load_image_processor
    from modeling_hierarchical import (
        HierarchicalEfficientNetV2Config,
        HierarchicalEfficientNetV2ForImageClassification,
        build_image_processor,
    )

    if args.model_dir is not None:
        model = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(args.model_dir).eval()
        processor, weights = load_image_processor(args.model_dir, model.config), f"weights of {args.model_dir}"
    else:
        image_size = json.loads(Path(args.recipe).read_text())["image_size"]
        torch.manual_seed(SEED)
        config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
        model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
        processor, weights = build_image_processor(config), f"random weights (seed {SEED})"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, weights


def export_and_quantize(model, folder: Path) -> tuple[Path, Path]:
    """`folder/model.onnx` from `export_onnx` and its int8 dynamic-quantised copy `folder/model.int8.onnx`."""
    from hierarchical.training.onnx_export import ONNX_FILE, export_onnx, import_extra

    fp32 = export_onnx(model, folder / ONNX_FILE)
    int8 = folder / "model.int8.onnx"
    quantization = import_extra("onnxruntime.quantization")
    quantization.quantize_dynamic(fp32, int8, weight_type=quantization.QuantType.QInt8)
    return fp32, int8


def measure_speeds(model, sessions: dict, args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Images/s of PyTorch eager and of every ONNX Runtime session, per batch size, on the same random inputs."""
    size = model.config.image_size
    speeds = {}
    for batch_size in BATCH_SIZES:
        images = args.timed_single_images if batch_size == 1 else args.timed_images
        batches = [torch.randn(batch_size, 3, size, size) for _ in range(max(1, images // batch_size))]
        arrays = [batch.numpy() for batch in batches]

        @torch.no_grad()
        def eager(batches=batches) -> None:
            for pixel_values in batches:
                model(pixel_values)

        runs = {"PyTorch eager fp32": eager}
        for name, session in sessions.items():
            runs[name] = lambda session=session, arrays=arrays: [session.logits(array) for array in arrays]
        for run in runs.values():
            run()  # warm-up
        timed = timed_runs(runs, args.repeats, len(batches) * batch_size)
        speeds[batch_size] = {name: max(values) for name, values in timed.items()}  # best of the repeats
    return speeds


def evaluation_images(args: argparse.Namespace, image_size: int):
    """Up to `--eval_images` PIL images with their (class, superclass) labels, and where they come from: the held-out
    split of `--dataset_name`, else (no labels) images spread over `--images`, else generated ones."""
    if args.dataset_name is None:
        from hierarchical.training.onnx_export import check_images

        images, source = check_images(args.images, args.eval_images, image_size)
        return images, None, source
    from hierarchical.data.arguments import EVALUATION_SPLITS

    splits, _ = prepare_splits(args.dataset_name, None)
    split = next((name for name in EVALUATION_SPLITS if name in splits), None)
    if split is None:
        raise ValueError(f"--dataset_name {args.dataset_name!r} has no held-out split ({', '.join(EVALUATION_SPLITS)})")
    rows = splits[split].select(range(min(args.eval_images, len(splits[split]))))
    labels = (np.asarray(rows["labels"]), np.asarray(rows["coarse_labels"]))
    return [image.convert("RGB") for image in rows["image"]], labels, f"{len(rows)} images of the {split} split"


def compare_answers(model, classifiers: dict, images, labels, trained: bool) -> list[str]:
    """Lines of the table: ONNX fp32 against PyTorch (largest logit difference), and int8 against fp32 (accuracy
    change with a trained model and labels, else agreement)."""
    processor = classifiers["fp32"].image_processor
    pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
    chunks = range(0, len(pixel_values), 64)
    logits = {}
    for name, classifier in classifiers.items():
        outputs = [classifier.logits(pixel_values[i : i + 64]) for i in chunks]  # [(fine, coarse), ...]
        logits[name] = [np.concatenate([output[head] for output in outputs]) for head in (0, 1)]
    with torch.no_grad():
        eager = [model(torch.from_numpy(pixel_values[i : i + 64])) for i in chunks]
    eager_logits = torch.cat([o.logits for o in eager]).numpy()
    answers = {
        name: classifiers[name].predict_from_logits(torch.from_numpy(fine), torch.from_numpy(coarse))
        for name, (fine, coarse) in logits.items()
    }
    fp32, int8 = answers["fp32"], answers["int8"]
    count = len(images)
    lines = [
        f"  ONNX fp32 vs PyTorch: logits max abs difference {np.abs(logits['fp32'][0] - eager_logits).max():.1e}; "
        f"int8 vs fp32: {np.abs(logits['int8'][0] - logits['fp32'][0]).max():.1e} "
        f"(fp32 logits spread {logits['fp32'][0].std():.1e})"
    ]
    if trained and labels is not None:
        for level, ids, target in (("class", "fine_ids", labels[0]), ("superclass", "coarse_ids", labels[1])):
            before = float((getattr(fp32, ids).numpy() == target).mean())
            after = float((getattr(int8, ids).numpy() == target).mean())
            lines.append(
                f"  {level} accuracy: fp32 {before:.2%}, int8 {after:.2%} (change {100 * (after - before):+.2f} points)"
            )
    agreements = {
        "class": (fp32.fine_ids == int8.fine_ids).float().mean().item(),
        "superclass": (fp32.coarse_ids == int8.coarse_ids).float().mean().item(),
    }
    if fp32.answer_levels is not None:
        same = [a == b for a, b in zip(fp32.answer_labels, int8.answer_labels, strict=True)]
        agreements[f"selective answer at {fp32.min_confidence:.3g}"] = float(np.mean(same))
    text = ", ".join(f"{name} {share:.1%}" for name, share in agreements.items())
    lines.append(f"  int8 agrees with fp32 on {count} images (agreement, not accuracy): {text}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Export, quantise, time and compare; print the table."""
    from hierarchical.training.onnx_export import OnnxHierarchicalClassifier

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu_before, start = busy_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model, weights = load_or_build_model(args, folder)
        config = model.config
        fp32_path, int8_path = export_and_quantize(model, folder)
        classifiers = {
            name: OnnxHierarchicalClassifier.from_pretrained(folder, path.name, args.threads)
            for name, path in (("fp32", fp32_path), ("int8", int8_path))
        }
        sizes = {name: path.stat().st_size / 2**20 for name, path in (("fp32", fp32_path), ("int8", int8_path))}
        sessions = {"ONNX Runtime fp32": classifiers["fp32"], "ONNX Runtime int8 (dynamic)": classifiers["int8"]}
        speeds = measure_speeds(model, sessions, args)
        images, labels, source = evaluation_images(args, config.image_size)
        comparison = compare_answers(model, classifiers, images, labels, trained=args.model_dir is not None)
    seconds = time.perf_counter() - start
    threads = args.threads or torch.get_num_threads()
    print(f"\nCPU inference at {config.image_size} px, {weights}, {threads} threads (best of {args.repeats} runs)")
    print(f"{'':30s}{'batch 1 img/s':>16s}{'batch 64 img/s':>16s}")
    for name in speeds[1]:
        print(f"{name:30s}{speeds[1][name]:16.1f}{speeds[64][name]:16.1f}")
    print(f"model.onnx {sizes['fp32']:.1f} MiB, model.int8.onnx {sizes['int8']:.1f} MiB. On {source}:")
    print("\n".join(comparison))
    share = other_cpu_share(cpu_before, seconds)
    if share is not None:
        print(f"Other processes took {share:.0%} of the CPUs during the {seconds:.0f} s run.")


if __name__ == "__main__":
    main()
