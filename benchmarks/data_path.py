"""The data path of `recipes/gpu_imagenet_384px.json`, before and after preprocessing moved to the device: bytes per
sample crossing the DataLoader and a worker's CPU time per 1,000 samples (`benchmark.py`, part 6)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from measuring import SEED, endless, one_thread, target_met
from workloads import RECIPE, recipe_options

if TYPE_CHECKING:
    from data_utils import DataArguments

DATA_PATH_SIZES = (224, 384)
# Bytes per CIFAR sample crossing the DataLoader, and how many times less worker CPU time per sample it takes at
# 384 px than when workers also resized, normalised, erased and mixed.
DATA_PATH_TARGETS = {"after_bytes_per_sample": ("<=", 4096.0), "worker_cpu_reduction_384": (">=", 10.0)}


def recipe_data_args() -> DataArguments:
    """`DataArguments` with the augmentation options of the GPU recipe (all the data path reads)."""
    from data_utils import DataArguments

    return DataArguments(**recipe_options())


def previous_train_transform(config, data_args):
    """The training transform as workers ran it before preprocessing moved to the device: for the torchvision
    policies, one per-image transform from the PIL image to the normalised float tensor at the model size (crop,
    flip, policy, resize, normalisation, random erasing); for 'original' and 'none', `BatchedAugment`, whose
    device-side steps then also run in the worker (`previous_collate`)."""
    from torchvision.transforms import v2

    from data_utils import PolicyAugment, RandomCropWithPadding, ToNormalizedFloat, build_train_transform, to_rgb

    if data_args.augmentation not in PolicyAugment.POLICIES:
        return build_train_transform(config, data_args)
    steps = [to_rgb]
    if data_args.random_crop:
        steps.append(RandomCropWithPadding())
    if data_args.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        PolicyAugment.POLICIES[data_args.augmentation](),
        v2.PILToTensor(),
        v2.Resize((config.image_size, config.image_size), antialias=True),
        ToNormalizedFloat(config.image_mean, config.image_std),
    ]
    if data_args.random_erasing > 0:
        steps.append(v2.RandomErasing(p=data_args.random_erasing, value=0))
    return v2.Compose(steps)


def previous_collate(collator, preprocess):
    """The collation as workers ran it before preprocessing moved to the device: the batch of model-size float
    images (after the device-side steps of 'original' and 'none', run here), then MixUp on the whole batch or
    CutMix by copying the rectangle, on the CPU, with the parameters the collator drew."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collator(examples)
        augmentation = batch.pop("augmentation", {})
        mix = {key: augmentation.pop(key) for key in ("mix_index", "mix_box", "mix_weights") if key in augmentation}
        batch = preprocess({**batch, "augmentation": augmentation})
        if not mix:
            return batch
        pixels, index = batch["pixel_values"], mix["mix_index"]
        top, left, bottom, right = mix["mix_box"][0].tolist()  # the same for every image of a batch
        pixel_lam, target_lam = mix["mix_weights"][0].tolist()
        if bottom > top and right > left:
            pixels[..., top:bottom, left:right] = pixels[index, :, top:bottom, left:right]
        elif pixel_lam != 1.0:
            pixels = pixels * pixel_lam + pixels[index] * (1.0 - pixel_lam)
        targets = torch.nn.functional.one_hot(batch["labels"], collator.config.num_labels).float()
        targets = targets * target_lam + targets[index] * (1.0 - target_lam)
        return {"pixel_values": pixels, "labels": targets, "coarse_labels": targets @ preprocess.hierarchy}

    return collate


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) batch."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def worker_cost(loader, batches: int, device_step: Callable[[dict], Any] | None = None) -> dict[str, float]:
    """Bytes per sample of `batches` batches of `loader` (after an untimed first one), the CPU time per 1,000
    samples of making them (what a worker does) and of `device_step` on them."""
    stream = endless(loader)
    next(stream)  # warm-up
    worker_seconds = device_seconds = 0.0
    samples = size = 0
    for _ in range(batches):
        start = time.process_time()
        batch = next(stream)
        worker_seconds += time.process_time() - start
        samples, size = samples + len(batch["labels"]), size + tensor_bytes(batch)
        if device_step is not None:
            start = time.process_time()
            device_step(batch)
            device_seconds += time.process_time() - start
    return {
        "bytes": size / samples,
        "worker_ms": 1e6 * worker_seconds / samples,
        "device_ms": 1e6 * device_seconds / samples,
    }


def measure_data_path(splits, data_args, image_size: int, batch_size: int, batches: int) -> dict[str, float]:
    """The GPU recipe's training data path at `image_size`, before and after preprocessing moved to the device:
    bytes per sample of the batches that cross the DataLoader, and CPU time per 1,000 samples of what a worker
    does (decode, augmentation, collation), measured in this process on one thread. Before: workers ship normalised
    float32 images at the model size, mixed. After: 8-bit images at the source size with the drawn parameters; the
    time `DevicePreprocessor` then takes on these batches on the CPU is measured separately (on a GPU it runs
    there)."""
    from datasets import Image
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, ImageTransform, build_train_transform
    from hierarchical.data.device_preprocess import DevicePreprocessor

    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    train = splits["train"].cast_column("image", Image(decode=False))
    collator = HierarchicalCollator(
        config, data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mix_prob, data_args.cutmix_switch_prob, SEED
    )
    preprocess = DevicePreprocessor(config)

    def loader(transform, collate_fn) -> DataLoader:
        dataset = train.with_transform(ImageTransform(transform, seed=SEED))
        generator = torch.Generator().manual_seed(SEED)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, generator=generator)

    with one_thread():  # a DataLoader worker runs with one thread
        before = worker_cost(
            loader(previous_train_transform(config, data_args), previous_collate(collator, preprocess)), batches
        )
        after = worker_cost(loader(build_train_transform(config, data_args), collator), batches, device_step=preprocess)
    return {
        "before_bytes_per_sample": before["bytes"],
        "after_bytes_per_sample": after["bytes"],
        "before_worker_cpu_ms_per_1000": before["worker_ms"],
        "after_worker_cpu_ms_per_1000": after["worker_ms"],
        "device_step_cpu_ms_per_1000": after["device_ms"],
    }


def measure_recipe_data_path(splits, batch_size: int, batches: int, repeats: int) -> dict:
    """`measure_data_path` at 224 and 384 px, best of `repeats` (the least CPU time of each figure), flattened
    into `<figure>_<size>` keys, with `after_bytes_per_sample` the largest of the sizes."""
    data_args = recipe_data_args()
    results: dict[str, Any] = {"data_path_sizes": list(DATA_PATH_SIZES), "data_path_recipe": RECIPE.name}
    for size in DATA_PATH_SIZES:
        runs = [measure_data_path(splits, data_args, size, batch_size, batches) for _ in range(repeats)]
        best = {name: min(run[name] for run in runs) for name in runs[0]}
        best["worker_cpu_reduction"] = best["before_worker_cpu_ms_per_1000"] / best["after_worker_cpu_ms_per_1000"]
        results.update({f"{name}_{size}": value for name, value in best.items()})
    results["after_bytes_per_sample"] = max(results[f"after_bytes_per_sample_{size}"] for size in DATA_PATH_SIZES)
    results["data_path_augmentation"] = recipe_options()
    return results


def print_data_path_table(results: dict[str, Any]) -> None:
    """The data path figures, before and after preprocessing moved to the device, then their targets."""
    r = results
    print(f"\ndata path of {r['data_path_recipe']}, batch {r['batch_size']}, one thread: {r['data_path_augmentation']}")
    print(
        f"{'size':>5} {'bytes/sample before':>20} {'after':>7} {'worker CPU ms/1000 before':>26} {'after':>7} "
        f"{'reduction':>9}  {'device step on the CPU ms/1000':>30}"
    )
    for size in r["data_path_sizes"]:
        print(
            f"{size:>5} {r[f'before_bytes_per_sample_{size}']:>20,.0f} {r[f'after_bytes_per_sample_{size}']:>7,.0f} "
            f"{r[f'before_worker_cpu_ms_per_1000_{size}']:>26,.0f} {r[f'after_worker_cpu_ms_per_1000_{size}']:>7,.0f} "
            f"{r[f'worker_cpu_reduction_{size}']:>8.1f}x  {r[f'device_step_cpu_ms_per_1000_{size}']:>30,.0f}"
        )
    for name, (direction, threshold) in DATA_PATH_TARGETS.items():
        met = target_met(r[name], direction, threshold)
        print(f"{name:<26} {r[name]:9.1f}  {direction} {threshold:<6g} {'met' if met else 'MISSED'}")
    print()
