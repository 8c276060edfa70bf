"""Preprocessing on the device: 8-bit batches at the source size from the workers, model inputs equal to the
per-image transforms, and a training step that never reads a value back from the device."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.utils import send_to_device
from torchvision.transforms import v2
from transformers import Trainer, TrainerCallback

import run_classification
from configuration_hierarchical import CIFAR100_FINE_TO_COARSE, HierarchicalEfficientNetV2Config
from conftest import encode_image, make_image_array, small_config, tiny_args
from data_utils import DataArguments
from hierarchical.data.augmentation import (
    PolicyAugment,
    RandomCropWithPadding,
    build_eval_transform,
    build_train_transform,
    derive_seed,
)
from hierarchical.data.collation import HierarchicalCollator, ImageTransform
from hierarchical.data.decoding import to_rgb
from hierarchical.data.device_preprocess import DevicePreprocessor, box_mask
from image_processing_hierarchical import ToNormalizedFloat
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification

SEED = 11


def encoded_batch(sizes: list[int | tuple[int, int]], mode: str = "RGB") -> dict[str, list]:
    """A batch as `Dataset.with_transform` passes it: encoded images (of the given sizes), labels and row indices."""
    rng = np.random.default_rng(3)
    images = [PIL.Image.fromarray(make_image_array(i, rng, size)).convert(mode) for i, size in enumerate(sizes)]
    labels = [(7 * i) % 100 for i in range(len(sizes))]
    return {
        "image": [{"bytes": encode_image(image), "path": None} for image in images],
        "labels": labels,
        "coarse_labels": [CIFAR100_FINE_TO_COARSE[label] for label in labels],
        "index": [10 + i for i in range(len(sizes))],
    }


def collate(output: dict[str, list], collator: HierarchicalCollator) -> dict:
    """A batch transform's output split into examples (as `Dataset.__getitems__` does) and collated."""
    return collator([{key: values[i] for key, values in output.items()} for i in range(len(output["index"]))])


def decoded(batch: dict[str, list]) -> list[PIL.Image.Image]:
    return [PIL.Image.open(io.BytesIO(value["bytes"])) for value in batch["image"]]


# ---------------------------------------------------------------------------------------------------------------
# What crosses the DataLoader
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["trivialaugment", "original"])
def test_collator_ships_8_bit_images_at_the_source_size(policy):
    config = small_config(image_size=224)
    args = DataArguments(augmentation=policy, random_erasing=0.25, mixup_alpha=0.2, cutmix_alpha=1.0)
    transform = ImageTransform(build_train_transform(config, args), seed=SEED)
    collator = HierarchicalCollator(config, args.mixup_alpha, args.cutmix_alpha, seed=SEED)
    batch = collate(transform(encoded_batch([32] * 6)), collator)
    assert list(batch)[0] == "labels"  # the Trainer reads the batch size from the first tensor
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["labels"].dtype == batch["coarse_labels"].dtype == torch.int64 and batch["labels"].shape == (6,)
    augmentation = batch["augmentation"]
    assert all(value.shape[0] == 6 for value in augmentation.values())
    assert augmentation["erase_box"].dtype == torch.int64 and augmentation["mix_index"].dtype == torch.int64
    if policy == "original":
        assert augmentation["affine"].shape == (6, 2, 3) and augmentation["jitter_order"].shape == (6, 3)
    tensors = [batch["labels"], batch["coarse_labels"], batch["pixel_values"], *augmentation.values()]
    assert sum(tensor.nbytes for tensor in tensors) / 6 <= 4096  # a CIFAR image is 3,072 bytes


def test_evaluation_batches_are_8_bit_and_never_augmented():
    config = small_config(image_size=64)
    batch = collate(ImageTransform()(encoded_batch([32, 32, 32])), HierarchicalCollator(config, mixup_alpha=1.0))
    assert sorted(batch) == ["coarse_labels", "labels", "pixel_values"]
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (3, 3, 32, 32)


def test_collator_refuses_labels_outside_the_classes():
    config = small_config(image_size=32)
    output = ImageTransform()(encoded_batch([32, 32, 32]))
    output["labels"][1] = 100
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 100\), got 100 at the example with index=11 \(1 of 3 rows"
    ):
        collate(output, HierarchicalCollator(config))
    output["labels"][1], output["coarse_labels"][2] = 5, -1
    with pytest.raises(
        ValueError, match=r"coarse_labels must be in \[0, 20\), got -1 at the example with index=12 \(1 of 3"
    ):
        collate(output, HierarchicalCollator(config))


# ---------------------------------------------------------------------------------------------------------------
# Same results as the per-image transforms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, image_size",
    [([32, 32, 32], 32), ([32, 32], 224), ([96, 96], 32), ([(40, 48), (40, 48)], 64), ([32, 48, 32], 64)],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_evaluation_on_the_device_equals_build_eval_transform(sizes, image_size, mode):
    config = small_config(image_size=image_size)
    batch = encoded_batch(sizes, mode)
    expected = torch.stack([build_eval_transform(config)(image) for image in decoded(batch)])
    collated = collate(ImageTransform()(batch), HierarchicalCollator(config))
    assert isinstance(collated["pixel_values"], list) == (len(set(sizes)) > 1)  # mixed sizes travel as a list
    ours = DevicePreprocessor(config)(collated)["pixel_values"]
    assert ours.shape == expected.shape == (len(sizes), 3, image_size, image_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def per_image_policy_transform(config: HierarchicalEfficientNetV2Config, args: DataArguments) -> v2.Compose:
    """The torchvision policies as one per-image transform on the CPU: PIL image -> normalised float tensor."""
    policy = {
        "trivialaugment": v2.TrivialAugmentWide,
        "randaugment": v2.RandAugment,
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    }[args.augmentation]
    return v2.Compose(
        [
            to_rgb,
            RandomCropWithPadding(),
            v2.RandomHorizontalFlip(),
            policy(),
            v2.PILToTensor(),
            v2.Resize((config.image_size, config.image_size), antialias=True),
            ToNormalizedFloat(config.image_mean, config.image_std),
            v2.RandomErasing(p=args.random_erasing, value=0),
        ]
    )


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
@pytest.mark.parametrize("image_size", [32, 64])
def test_policy_training_on_the_device_equals_the_per_image_transform(policy, image_size):
    config = small_config(image_size=image_size)
    args = DataArguments(augmentation=policy, random_erasing=0.5)
    batch = encoded_batch([32] * 12)
    reference = per_image_policy_transform(config, args)
    expected = []
    with torch.random.fork_rng(devices=[]):
        for image, index in zip(decoded(batch), batch["index"], strict=True):
            torch.manual_seed(derive_seed(SEED, 0, index))
            expected.append(reference(image))
    transform = ImageTransform(build_train_transform(config, args), seed=SEED)
    assert isinstance(transform.transform, PolicyAugment)
    ours = DevicePreprocessor(config)(collate(transform(batch), HierarchicalCollator(config)))["pixel_values"]
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-6, rtol=0)
    erased = [(image == 0).all(0).sum().item() for image in ours]  # all three channels at the mean colour
    assert any(count > 0 for count in erased) and any(count == 0 for count in erased)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_device_mixing_equals_torchvision_with_the_same_parameters(kind):
    # Fixed parameters instead of drawn ones: torchvision's MixUp/CutMix pair image i with image i - 1 and take
    # `lam` or the rectangle as given, so the device must produce the same pixels and targets from them.
    config = small_config(image_size=64)
    labels = torch.tensor([3, 17, 42, 42, 90, 5])
    coarse_labels = torch.tensor([CIFAR100_FINE_TO_COARSE[label] for label in labels.tolist()])
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = {"labels": labels, "coarse_labels": coarse_labels, "pixel_values": pixels}
    preprocess = DevicePreprocessor(config)
    unmixed = preprocess(batch)["pixel_values"]  # (6, 3, 64, 64), normalised
    if kind == "mixup":
        reference, params, box, weights = v2.MixUp(num_classes=100), {"lam": 0.3}, (0, 0, 0, 0), (0.3, 0.3)
    else:  # rows 10 to 39, columns 5 to 28 of the 64 x 64 model input come from the partner
        kept = 1.0 - (30 * 24) / (64 * 64)
        reference, params = v2.CutMix(num_classes=100), {"box": (5, 10, 29, 40), "lam_adjusted": kept}
        box, weights = (10, 5, 40, 29), (1.0, kept)
    augmentation = {
        "mix_index": torch.tensor([5, 0, 1, 2, 3, 4]),  # image i's partner is image i - 1
        "mix_box": torch.tensor(box).expand(6, 4),
        "mix_weights": torch.tensor(weights).expand(6, 2),
    }
    ours = preprocess({**batch, "augmentation": augmentation})
    expected_pixels = reference.transform(unmixed, {**params, "labels": labels, "batch_size": 6})
    torch.testing.assert_close(ours["pixel_values"], expected_pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["labels"], reference.transform(labels, {**params, "labels": labels}))
    coarse_reference = type(reference)(num_classes=20)
    expected_coarse = coarse_reference.transform(coarse_labels, {**params, "labels": coarse_labels})
    torch.testing.assert_close(ours["coarse_labels"], expected_coarse)
    if kind == "cutmix":  # outside the rectangle every image is its own
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[10:40, 5:29] = True
        assert torch.equal(ours["pixel_values"][..., ~inside], unmixed[..., ~inside])
        assert torch.equal(ours["pixel_values"][1][..., inside], unmixed[0][..., inside])


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha, mix_prob", [(0.2, 0.0, 1.0), (0.0, 1.0, 1.0), (0.4, 1.0, 0.8)])
def test_collator_draws_partners_rectangles_and_weights(mixup_alpha, cutmix_alpha, mix_prob):
    # 400 batches: each a permutation of partners, one rectangle and one pair of weights for the batch; CutMix
    # weighs the targets by the share of the image kept, MixUp pixels and targets alike; mixed batches, CutMix
    # batches and the MixUp weights in the proportions the options ask for.
    collator = HierarchicalCollator(small_config(image_size=64), mixup_alpha, cutmix_alpha, mix_prob=mix_prob)
    mixed, cutmix, mixup_weights = 0, 0, []
    for seed in range(400):
        drawn = collator.mix_parameters(8, np.random.default_rng(seed))
        assert sorted(drawn["mix_index"].tolist()) == list(range(8))
        assert (drawn["mix_box"] == drawn["mix_box"][0]).all() and (
            drawn["mix_weights"] == drawn["mix_weights"][0]
        ).all()
        top, left, bottom, right = drawn["mix_box"][0].tolist()
        pixel_weight, target_weight = drawn["mix_weights"][0].tolist()
        assert 0 <= top <= bottom <= 64 and 0 <= left <= right <= 64
        if drawn["mix_index"].tolist() == list(range(8)):  # not mixed (a drawn permutation is this 1 in 8!)
            assert (pixel_weight, target_weight, bottom - top, right - left) == (1.0, 1.0, 0, 0)
            continue
        mixed += 1
        if bottom > top and right > left:
            cutmix += 1
            assert pixel_weight == 1.0
            assert target_weight == pytest.approx(1 - (bottom - top) * (right - left) / 64**2)
        else:
            assert target_weight == pixel_weight
            mixup_weights.append(pixel_weight)
    assert mixed / 400 == pytest.approx(mix_prob, abs=0.05)
    expected_cutmix = 0.0 if cutmix_alpha == 0 else 1.0 if mixup_alpha == 0 else collator.cutmix_switch_prob
    assert cutmix / mixed == pytest.approx(expected_cutmix, abs=0.08)
    if mixup_alpha > 0:  # Beta(alpha, alpha) has mean 1/2
        assert np.mean(mixup_weights) == pytest.approx(0.5, abs=0.08)


def test_box_mask_matches_torchvision_erase():
    image = torch.rand(3, 20, 24)
    boxes = torch.tensor([[2, 3, 9, 15], [0, 0, 0, 0], [0, 0, 20, 24]])
    masked = image.expand(3, 3, 20, 24).masked_fill(box_mask(boxes, (20, 24)), 0.0)
    torch.testing.assert_close(masked[0], v2.functional.erase(image, 2, 3, 7, 12, torch.tensor(0.0)), atol=0, rtol=0)
    assert torch.equal(masked[1], image) and not masked[2].any()


# ---------------------------------------------------------------------------------------------------------------
# Nothing is read back from the device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["trivialaugment", "original"])
def test_training_batch_preprocesses_and_trains_without_reading_values(policy):
    """On the meta device tensors have no values, so any read-back (`.item()`, `bool()`, `nonzero`, a host copy)
    fails: the device step and the model's forward and backward must run there, as on a GPU without a sync."""
    config = small_config(image_size=64)
    args = DataArguments(augmentation=policy, random_erasing=1.0, mixup_alpha=0.2, cutmix_alpha=1.0)
    transform = ImageTransform(build_train_transform(config, args), seed=SEED)
    batch = collate(transform(encoded_batch([32] * 4)), HierarchicalCollator(config, 0.2, 1.0, seed=SEED))
    inputs = DevicePreprocessor(config).to("meta")(send_to_device(batch, "meta"))
    assert inputs["pixel_values"].device.type == "meta" and inputs["pixel_values"].shape == (4, 3, 64, 64)
    with torch.device("meta"):
        model = HierarchicalEfficientNetV2ForImageClassification(config)
    model(**inputs).loss.backward()
    hard_labels = torch.tensor([0, 250, -3, 7], device="meta")  # out of range, but not checked on a device
    assert model(inputs["pixel_values"], labels=hard_labels).loss.device.type == "meta"


def test_forward_still_checks_label_range_on_the_cpu():
    model = HierarchicalEfficientNetV2ForImageClassification(small_config(image_size=32)).eval()
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 100\), got 250 at row 1 \(1 of 2 rows out of range\)"
    ):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 250]))


# ---------------------------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_keeps_non_finite_losses_out_of_the_logs_on_the_device(tiny_parquet_dir, tmp_path, monkeypatch):
    """The Trainer's own filter reads every loss on the host; the HierarchicalTrainer filters on the device, and
    the option reads as given wherever else it is used (evaluation, saved options)."""
    seen = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen.append(("non_blocking", train_dataloader._non_blocking))

        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("step", args.logging_nan_inf_filter))

        def on_evaluate(self, args, state, control, **kwargs):
            seen.append(("evaluate", args.logging_nan_inf_filter))

    training_step, save = Trainer.training_step, Trainer._save

    def nan_at_step_three(self, model, inputs, num_items_in_batch=None):
        loss = training_step(self, model, inputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step == 2 else loss

    def recording_save(self, *args, **kwargs):
        seen.append(("save", self.args.logging_nan_inf_filter))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", nan_at_step_three)
    monkeypatch.setattr(Trainer, "_save", recording_save)
    output_dir = tmp_path / "out"
    extra = ["--do_train", "--do_eval", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps"]
    extra += ["--logging_nan_inf_filter", "true"]  # off by default: a non-finite loss then stops the run
    run_classification.main(tiny_args(tiny_parquet_dir, output_dir, *extra, "--save_steps", "2"), [Record()])

    losses = [
        entry["loss"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[2] == 0.0  # the mean of the losses since the last log (none: it logs every step), as the Trainer's
    assert seen[0] == ("non_blocking", True)
    assert {value for kind, value in seen if kind == "step"} == {False}  # the Trainer's host-side check is off
    assert {value for kind, value in seen if kind in ("evaluate", "save")} == {True}
    assert {kind for kind, _ in seen} == {"non_blocking", "step", "evaluate", "save"}


def test_torch_compile_traces_the_whole_training_forward_as_one_graph():
    """A graph break in the forward makes dynamo give up on it and compile each block on its own, recompiling for
    every stochastic-depth rate until its limit, after which the blocks run eagerly."""
    from torch._dynamo.utils import counters

    config = small_config(num_frozen_stages=0)
    model = HierarchicalEfficientNetV2ForImageClassification(config).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    compiled(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    torch._dynamo.reset()
