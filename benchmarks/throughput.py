"""Throughput of the data pipeline alone (`benchmark.py` part 3 in the main process, `gpu_check.py` part 3 with
workers) and of inference on PIL images by hand, by the forward alone, by `pipeline("image-classification")` and by
`pipeline("hierarchical-image-classification")` at its default batch size (`benchmark.py` part 4)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from measuring import SEED, images_per_s, one_thread, synchronize


def prepare_splits(dataset: str, cache_dir: str | None):
    """The dataset as `run_classification.py` prepares it (the image size does not matter at this stage)."""
    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import DataArguments, prepare_datasets

    data_args = DataArguments(dataset_name=dataset, cache_dir=cache_dir)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None)
    return prepare_datasets(data_args, config, seed=SEED), data_args


def measure_loader(splits, data_args, image_size: int, batch_size: int, batches: int) -> float:
    """Images/s of decode + augmentation + collation of training batches in the main process, on one thread."""
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, apply_transforms

    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    train = apply_transforms(splits, config, data_args, seed=SEED)["train"]
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=HierarchicalCollator(config, seed=SEED),
        generator=torch.Generator().manual_seed(SEED),
    )
    with one_thread():  # a DataLoader worker runs with one thread
        return images_per_s(loader, batches)


def measure_worker_loader(argv: list[str], batch_size: int, workers: int, batches: int, device: str) -> float:
    """Images/s of the training batches `run_classification.py` makes for `argv` (decode, policy, collation in
    `workers` workers, pinned memory on CUDA), without training."""
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, apply_transforms, prepare_datasets
    from run_classification import parse_args

    model_args, data_args, _ = parse_args(argv)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None, **model_args.config_overrides())
    train = apply_transforms(prepare_datasets(data_args, config, seed=SEED), config, data_args, seed=SEED)["train"]
    collator = HierarchicalCollator(
        config, data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mix_prob, data_args.cutmix_switch_prob, SEED
    )
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=collator,
        pin_memory=device.startswith("cuda"),
        generator=torch.Generator().manual_seed(SEED),
    )
    return images_per_s(loader, batches)


def saved_random_model(image_size: int, folder: Path, device: str):
    """A random model (seed `SEED`) in eval mode on `device` and its image processor, both saved to `folder`."""
    from modeling_hierarchical import (
        HierarchicalEfficientNetV2Config,
        HierarchicalEfficientNetV2ForImageClassification,
        build_image_processor,
    )

    torch.manual_seed(SEED)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    processor = build_image_processor(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model.to(device), processor


def timed_runs(runs: dict[str, Callable[[], object]], repeats: int, num_items: int) -> dict[str, list[float]]:
    """Items/s of every run in `runs`, run `repeats` times in turn (ABAB...): the speeds of each, in order, so that
    the i-th speeds of two runs were measured back to back."""
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            speeds[name].append(num_items / (time.perf_counter() - start))
    return speeds


def measure_inference(
    splits, image_size: int, batch_size: int, num_images: int, repeats: int, device: str, folder: Path
) -> dict[str, float]:
    """Images/s of classifying the same PIL images four ways: by hand in batches (image processor on a batch, then
    an eval-mode forward under no_grad), the forward alone on pre-processed tensors,
    `pipeline("image-classification", batch_size=...)` loading the model and image processor saved to `folder`, and
    `pipeline("hierarchical-image-classification")` at the batch size a user gets without asking for one."""
    from transformers import pipeline

    model, processor = saved_random_model(image_size, folder, device)
    source = splits["train"]
    rows = [i % len(source) for i in range(num_images)]
    images = [image.convert("RGB") for image in source.select(rows)["image"]]  # decoded once, outside the timing
    image_batches = [images[start : start + batch_size] for start in range(0, num_images, batch_size)]
    tensor_batches = [
        processor(images=batch, return_tensors="pt")["pixel_values"].to(device) for batch in image_batches
    ]
    classifier = pipeline(
        "image-classification", model=str(folder), batch_size=batch_size, device=device, trust_remote_code=True
    )
    hierarchical = pipeline(  # at its default batch size
        "hierarchical-image-classification", model=str(folder), device=device, trust_remote_code=True
    )

    @torch.no_grad()
    def batched() -> torch.Tensor:
        logits = [
            model(pixel_values=processor(images=batch, return_tensors="pt")["pixel_values"].to(device)).logits
            for batch in image_batches
        ]
        return torch.cat(logits).cpu()

    @torch.no_grad()
    def forward_only() -> None:
        for pixel_values in tensor_batches:
            model(pixel_values=pixel_values)
        synchronize(device)

    batched(), classifier(images[:batch_size]), hierarchical(images[:batch_size])  # warm-up
    # The pipelines return Python lists and `batched` a CPU tensor: nothing is left queued when they return.
    runs = {
        "batched": batched,
        "forward": forward_only,
        "pipeline": lambda: classifier(images),
        "hierarchical": lambda: hierarchical(images),
    }
    speeds = timed_runs(runs, repeats, num_images)
    # Same model, same inputs: the top-1 classes agree. Raw logits, since a random model's softmax scores tie.
    checked = classifier(image_batches[0], function_to_apply="none", top_k=1)
    expected = [model.config.id2label[int(i)] for i in batched()[: len(checked)].argmax(-1)]
    agreement = float(np.mean([p[0]["label"] == e for p, e in zip(checked, expected, strict=True)]))
    return {
        "batched_images_per_s": max(speeds["batched"]),
        "forward_only_images_per_s": max(speeds["forward"]),
        "pipeline_images_per_s": max(speeds["pipeline"]),
        "pipeline_images_per_s_runs": speeds["pipeline"],
        "batched_images_per_s_runs": speeds["batched"],
        "pipeline_top1_agreement": agreement,
        "hierarchical_pipeline_images_per_s": max(speeds["hierarchical"]),
        "hierarchical_pipeline_images_per_s_runs": speeds["hierarchical"],
        "hierarchical_pipeline_batch_size": hierarchical._batch_size,
    }
