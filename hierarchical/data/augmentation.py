"""Training augmentation and the model-input transforms, every random draw seeded from (seed, epoch, row index)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import v2

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.data.arguments import DataArguments
from hierarchical.data.decoding import to_rgb
from hierarchical.data.device_preprocess import JITTER_ORDERS, DevicePreprocessor
from image_processing_hierarchical import build_model_input_transform

IntOrArray = TypeVar("IntOrArray", int, np.ndarray)
MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment


def splitmix64(state: IntOrArray) -> IntOrArray:
    """splitmix64's output function: a well-mixed 64-bit value for a state, a Python int or a `uint64` array."""
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & MASK64
    return state ^ (state >> 31)


# Not numpy.random.SeedSequence: it would give other seeds, and so change the augmentations of runs being resumed.
def derive_seed(*values: int) -> int:
    """A 63-bit seed from a few integers (a splitmix64 chain): the same in every process, run and platform."""
    state = 0
    for value in values:
        state = splitmix64(((state ^ (int(value) & MASK64)) + GOLDEN_GAMMA) & MASK64)
    return state >> 1


def crop_padding(size: tuple[int, int]) -> int:
    """Pixels of zero padding on each side for the random crop of an image of `size`: 4 px at 32 px, the same share of
    the shorter side at other sizes (at least 1)."""
    return max(1, round(min(size) * 4 / 32))


class RandomCropWithPadding(torch.nn.Module):
    """CIFAR-style random crop of a PIL image: zero-pad every side by [`crop_padding`], then crop back to the
    original size. Same distribution as `v2.RandomCrop(size, padding)`, cheaper: 71 against 180 microseconds per
    32 px image on one CPU thread.
    """

    def forward(self, image: PIL.Image.Image) -> PIL.Image.Image:
        pad = crop_padding(image.size)
        dx, dy = torch.randint(-pad, pad + 1, (2,)).tolist()
        if dx == 0 and dy == 0:
            return image
        shifted = PIL.Image.new(image.mode, image.size)  # black, as zero padding
        shifted.paste(image, (-dx, -dy))
        return shifted


def uniform_draws(seeds: list[int], count: int) -> torch.Tensor:
    """`(len(seeds), count)` float64 uniforms in [0, 1), a pure function of each seed (a splitmix64 counter)."""
    counters = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GOLDEN_GAMMA)  # wraps modulo 2**64
    state = splitmix64(np.asarray(seeds, dtype=np.uint64)[:, None] + counters)
    return torch.from_numpy((state >> 11).astype(np.float64) / 2.0**53)


NO_BOX = (0, 0, 0, 0)  # an empty (top, left, bottom, right) rectangle


class TrainAugment:
    """A training augmentation split in two: `sample` runs in the DataLoader workers at the source resolution and
    draws every random parameter; `DevicePreprocessor` applies the rest to whole batches on the training device.

    Args:
        config (`HierarchicalEfficientNetV2Config`):
            Model image size and normalisation.
        args (`DataArguments`):
            The augmentation options.

    `sample(images, seeds)` returns 8-bit `(3, H, W)` tensors at the source size and a dict of per-image parameter
    tensors (see `DevicePreprocessor`); image i draws only from `seeds[i]`, so its augmentation does not depend on
    the batch it is in. Calling the object on one PIL image runs both parts, with a seed drawn from the global torch
    RNG like a torchvision transform, and returns a normalised `(3, S, S)` float tensor.
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        self.image_size = config.image_size
        self.random_erasing = v2.RandomErasing(p=args.random_erasing, value=0) if args.random_erasing > 0 else None
        self.preprocessor = DevicePreprocessor(config)

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        """8-bit tensors at the source size and the per-image parameters of the device-side steps."""
        raise NotImplementedError

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """Augment one PIL image (any mode) into a normalised `(3, S, S)` float tensor."""
        images, parameters = self.sample([image], [int(torch.randint(2**62, ()))])
        return self.preprocessor({"pixel_values": images[0][None], "augmentation": parameters})["pixel_values"][0]

    def _erase_box(self) -> tuple[int, int, int, int]:
        """The rectangle `v2.RandomErasing` would erase at the model size, drawn from the current torch RNG."""
        if self.random_erasing is None or torch.rand(1) >= self.random_erasing.p:  # as its forward draws
            return NO_BOX
        shape_only = torch.zeros(1, 1, 1).expand(3, self.image_size, self.image_size)  # only its size is read
        params = self.random_erasing.make_params([shape_only])
        if params["v"] is None:  # no rectangle fitted in ten tries: nothing is erased
            return NO_BOX
        return params["i"], params["j"], params["i"] + params["h"], params["j"] + params["w"]


class PolicyAugment(TrainAugment):
    """Crop, flip and a torchvision policy ('trivialaugment', 'randaugment', 'autoaugment') on 8-bit PIL images at
    their source resolution, where they are cheapest, then random erasing on the device.

    Each image runs under the torch CPU RNG seeded with its seed (inside `torch.random.fork_rng`); the erased
    rectangle is drawn right after the policy from the same stream, as when `v2.RandomErasing` ended the transform.
    """

    POLICIES = {
        "trivialaugment": v2.TrivialAugmentWide,
        "randaugment": v2.RandAugment,
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    }

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        super().__init__(config, args)
        steps: list[Callable] = [to_rgb]
        if args.random_crop:
            steps.append(RandomCropWithPadding())
        if args.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [self.POLICIES[args.augmentation](), v2.PILToTensor()]
        self.transform = v2.Compose(steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform}, random_erasing={self.random_erasing})"

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        outputs, boxes = [], []
        with torch.random.fork_rng(devices=[]):
            for image, seed in zip(images, seeds, strict=True):
                torch.default_generator.manual_seed(seed)
                outputs.append(self.transform(image))
                boxes.append(self._erase_box())
        parameters = {"erase_box": torch.tensor(boxes, dtype=torch.long)} if self.random_erasing is not None else {}
        return outputs, parameters


class BatchedAugment(TrainAugment):
    """The 'original' (or 'none') training augmentation, drawn per image and applied to whole batches.

    Per image: CIFAR-style random crop with zero padding, horizontal flip and rotation (bilinear, black fill), done
    together by one `grid_sample` at the source resolution; then brightness, contrast and saturation jitter in a
    random order (`v2.ColorJitter`'s factors and blends); then the resize to the model size, normalisation and
    random erasing. The workers only decode the image and draw these parameters from the image's seed; every step
    runs on the batch in `DevicePreprocessor`.

    Args:
        config (`HierarchicalEfficientNetV2Config`):
            Model image size and normalisation.
        args (`DataArguments`):
            `random_crop`, `horizontal_flip`, `rotation_degrees` and `color_jitter` (used with the 'original'
            policy only) and `random_erasing`.
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        super().__init__(config, args)
        original = args.augmentation == "original"
        self.random_crop = args.random_crop
        self.horizontal_flip = args.horizontal_flip
        self.rotation_degrees = args.rotation_degrees if original else 0.0
        self.color_jitter = args.color_jitter if original else 0.0

    def __repr__(self) -> str:
        options = ("random_crop", "horizontal_flip", "rotation_degrees", "color_jitter", "image_size")
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)}' for name in options)})"

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        tensors = [v2.functional.pil_to_tensor(to_rgb(image)) for image in images]
        return tensors, self.parameters([tuple(tensor.shape[-2:]) for tensor in tensors], seeds)

    def batch(self, images: list[torch.Tensor], seeds: list[int]) -> list[torch.Tensor]:
        """Augment 8-bit `(3, H, W)` RGB tensors completely, image i with `seeds[i]`; sizes may differ."""
        parameters = self.parameters([tuple(image.shape[-2:]) for image in images], seeds)
        return list(self.preprocessor({"pixel_values": list(images), "augmentation": parameters})["pixel_values"])

    def parameters(self, sizes: list[tuple[int, int]], seeds: list[int]) -> dict[str, torch.Tensor]:
        """The per-image parameters of images of `sizes` (height, width), image i drawn from `seeds[i]`."""
        draws = uniform_draws(seeds, 8)
        parameters = {}
        if self.random_crop or self.horizontal_flip or self.rotation_degrees > 0:
            parameters["affine"] = self._affine(sizes, draws)
        if self.color_jitter > 0:
            low = max(0.0, 1.0 - self.color_jitter)
            parameters["jitter_factors"] = (low + draws[:, 4:7] * (1.0 + self.color_jitter - low)).float()
            parameters["jitter_order"] = JITTER_ORDERS[(draws[:, 7] * len(JITTER_ORDERS)).long()]
        if self.random_erasing is not None:
            with torch.random.fork_rng(devices=[]):
                boxes = []
                for seed in seeds:
                    torch.default_generator.manual_seed(derive_seed(seed, 1))
                    boxes.append(self._erase_box())
            parameters["erase_box"] = torch.tensor(boxes, dtype=torch.long)
        return parameters

    def _affine(self, sizes: list[tuple[int, int]], draws: torch.Tensor) -> torch.Tensor:
        """`(n, 2, 3)` `affine_grid` matrices that shift (crop with padding), flip and rotate each image."""
        n = len(sizes)
        height = torch.tensor([size[0] for size in sizes], dtype=torch.float64)
        width = torch.tensor([size[1] for size in sizes], dtype=torch.float64)
        shift = torch.zeros(n, 2, dtype=torch.float64)  # pixels, (x, y)
        if self.random_crop:
            pad = torch.tensor([crop_padding(size) for size in sizes], dtype=torch.float64)[:, None]
            shift = torch.floor(draws[:, 0:2] * (2 * pad + 1)) - pad
        flip = torch.ones(n, dtype=torch.float64)
        if self.horizontal_flip:
            flip = torch.where(draws[:, 2] < 0.5, -1.0, 1.0)
        angle = torch.deg2rad((2 * draws[:, 3] - 1) * self.rotation_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output point p (normalised coordinates) samples the source at S^-1 F R S p + 2 shift / size, where S scales
        # normalised coordinates to pixels, R rotates and F flips: crop, then flip, then rotate, as applied in turn.
        theta = torch.empty(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = flip * cos, -flip * sin * height / width
        theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
        theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / width, 2 * shift[:, 1] / height
        return theta.float()


def build_eval_transform(config: HierarchicalEfficientNetV2Config) -> v2.Compose:
    """An image (PIL of any mode, file path or bytes) -> normalised (3, S, S) float tensor: the model's own
    `build_model_input_transform`, which its saved image processor and the pipelines run too."""
    return build_model_input_transform(config.image_size, config.image_mean, config.image_std)


def build_train_transform(config: HierarchicalEfficientNetV2Config, args: DataArguments) -> TrainAugment:
    """The training augmentation of `args.augmentation`, split between the DataLoader workers and the device.

    'original' and 'none' give a `BatchedAugment`: the workers only decode and draw parameters, every step runs on
    the batch on the device. The torchvision policies give a `PolicyAugment`: crop, flip and the policy run image by
    image on the 8-bit PIL image at its source resolution, where they are cheapest (at 32 px, PIL beats tensor
    kernels). In both cases the resize to the model size, the normalisation (as in `build_eval_transform`) and random
    erasing on the normalised image run on the device (`DevicePreprocessor`). Called on one PIL image, the result
    runs everything and returns a normalised `(3, S, S)` float tensor.
    """
    if args.augmentation in PolicyAugment.POLICIES:
        return PolicyAugment(config, args)
    return BatchedAugment(config, args)
