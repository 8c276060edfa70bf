"""Tests of the data pipeline: sources, validation, transforms, seeding and collation."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import HfArgumentParser, TrainerControl, TrainerState, TrainingArguments, ViTImageProcessor

from configuration_hierarchical import CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE, HierarchicalEfficientNetV2Config
from conftest import (
    NUM_FINE,
    data_args,
    encode_image,
    make_image_array,
    make_parquet_dataset,
    small_config,
    write_cifar_python,
)
from data_utils import (
    AUGMENTATION_POLICIES,
    JITTER_ORDERS,
    BatchedAugment,
    CifarUnpickler,
    DataArguments,
    EpochCallback,
    HierarchicalCollator,
    ImageTransform,
    PolicyAugment,
    apply_transforms,
    build_eval_transform,
    build_train_transform,
    decode_image,
    load_raw_datasets,
    prepare_datasets,
    uniform_draws,
)
from hierarchical.data.device_preprocess import DevicePreprocessor
from hierarchical.data.sources import source_folder

STANDARD_COLUMNS = ["image", "labels", "coarse_labels", "index"]


def make_image_folder(root: Path, class_names: list[str], per_class: int = 2) -> Path:
    """`root/train/<class>/<i>.png` and `root/test/<class>/<i>.png`."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(class_names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = make_image_array(label, rng)
                PIL.Image.fromarray(image).save(folder / f"{i}.png")
    return root


def assert_standard(split: datasets.Dataset, expected_labels: list[int]) -> None:
    assert split.column_names == STANDARD_COLUMNS
    assert isinstance(split.features["image"], datasets.Image)
    labels = split.with_format("numpy")[:]["labels"]
    coarse = split.with_format("numpy")[:]["coarse_labels"]
    assert Counter(labels.tolist()) == Counter(expected_labels)
    np.testing.assert_array_equal(coarse, np.array(CIFAR100_FINE_TO_COARSE)[labels])
    np.testing.assert_array_equal(split.with_format("numpy")[:]["index"], np.arange(len(split)))
    assert split[0]["image"].size == (32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "glob", "single_file"])
def test_parquet_sources_load_into_standard_columns(tiny_parquet_dir, tmp_path, source):
    name = {
        "folder": tiny_parquet_dir,
        "glob": f"{tiny_parquet_dir}/*.parquet",
        "single_file": tiny_parquet_dir / "test-00000-of-00001.parquet",
    }[source]
    prepared = prepare_datasets(data_args(tmp_path, name, train_val_split=0.0), small_config(), seed=0)
    if source == "single_file":
        assert list(prepared) == ["test"]
    else:
        assert list(prepared) == ["train", "test"]
        assert_standard(prepared["train"], [label for label in range(NUM_FINE) for _ in range(2)])
    assert_standard(prepared["test"], list(range(NUM_FINE)))
    assert prepared["test"]["labels"][:3] == [0, 1, 2]  # row order kept


def test_relative_image_paths_of_a_glob_resolve_in_the_folder_of_its_files(tmp_path):
    """A pattern that also matches folders (`data/**` matches `data/` itself) resolves relative image paths in the
    folder of the files it loads, as `load_raw_datasets` does, not in the folder above."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.parquet").write_bytes(b"")
    assert source_folder(data_args(tmp_path, f"{data}/**")) == str(data)
    assert source_folder(data_args(tmp_path, f"{data}/*")) == str(data)


@pytest.mark.parametrize("source", ["save_to_disk", "arrow_glob"])
def test_arrow_sources_load_into_standard_columns(tiny_parquet_dir, tmp_path, source):
    parquet = {split: str(tiny_parquet_dir / f"{split}-00000-of-00001.parquet") for split in ("train", "test")}
    saved = tmp_path / "saved"
    datasets.DatasetDict({split: datasets.Dataset.from_parquet(file) for split, file in parquet.items()}).save_to_disk(
        str(saved)
    )
    name = saved if source == "save_to_disk" else f"{saved}/*/*.arrow"
    prepared = prepare_datasets(data_args(tmp_path, name, train_val_split=0.0), small_config(), seed=0)
    assert list(prepared) == ["train", "test"]
    assert_standard(prepared["train"], [label for label in range(NUM_FINE) for _ in range(2)])
    assert_standard(prepared["test"], list(range(NUM_FINE)))


def test_parquet_shards_without_split_names_are_training_data(tmp_path):
    make_parquet_dataset(tmp_path / "data", file_name="shard-a.parquet", seed=0)
    make_parquet_dataset(tmp_path / "data", file_name="shard-b.parquet", seed=1)
    raw = load_raw_datasets(data_args(tmp_path, tmp_path / "data"))
    assert list(raw) == ["train"] and len(raw["train"]) == 2 * NUM_FINE


def test_parquet_shards_partly_named_after_splits_are_refused(tmp_path):
    make_parquet_dataset(tmp_path / "data", split="train")
    make_parquet_dataset(tmp_path / "data", file_name="extra.parquet")
    with pytest.raises(ValueError, match="not named after a split.*extra.parquet"):
        load_raw_datasets(data_args(tmp_path, tmp_path / "data"))


@pytest.mark.parametrize("by_option", [False, True])
def test_image_folder_maps_class_names_onto_the_config(tmp_path, by_option):
    names = ["apple", "crab", "worm"]
    root = make_image_folder(tmp_path / "images", names)
    args = (
        data_args(tmp_path, "imagefolder", data_dir=str(root), train_val_split=0.0)
        if by_option
        else data_args(tmp_path, root, train_val_split=0.0)
    )
    prepared = prepare_datasets(args, small_config(), seed=0)
    expected = [CIFAR100_FINE_LABELS.index(name) for name in names for _ in range(2)]
    assert_standard(prepared["train"], expected)
    assert_standard(prepared["test"], expected)


def test_image_folder_with_unknown_class_names_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images", ["apple", "dragon", "unicorn"], per_class=1)
    with pytest.raises(ValueError, match=r"2 class names .* \['dragon', 'unicorn'\]"):
        prepare_datasets(data_args(tmp_path, root), small_config(), seed=0)


@pytest.mark.parametrize("name", ["cifar-100-python", "parent"])
def test_cifar_python_folder_loads_into_standard_columns(tiny_cifar_python_dir, tmp_path, name):
    folder = tiny_cifar_python_dir if name == "cifar-100-python" else tiny_cifar_python_dir.parent
    prepared = prepare_datasets(data_args(tmp_path, folder, train_val_split=0.0), small_config(), seed=0)
    assert list(prepared) == ["train", "test"]
    assert_standard(prepared["train"], list(range(NUM_FINE)))
    assert_standard(prepared["test"], list(range(0, NUM_FINE, 2)))
    # pixels are the CHW rows of b"data" turned back into an image
    content = pickle.loads((tiny_cifar_python_dir / "test").read_bytes())
    expected = content[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(prepared["test"][3]["image"]), expected)


def test_cifar_unpickler_accepts_the_numpy_globals_of_old_and_new_files():
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        assert callable(CifarUnpickler.ALLOWED_GLOBALS[(module, "_reconstruct")])


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(
    "payload, refused", [(_SystemPayload, r"(posix|nt)\.system"), (_EvalPayload, r"builtins\.eval")]
)
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, payload, refused):
    folder = write_cifar_python(tmp_path / "cifar-100-python", [0, 1], [0])
    marker = tmp_path / "payload-ran"
    (folder / "train").write_bytes(pickle.dumps({b"data": payload(marker)}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=f"refused to load the global ({refused})"):
        load_raw_datasets(data_args(tmp_path, folder))
    assert not marker.exists()


def test_offline_hub_id_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="could not be downloaded") as raised:
        load_raw_datasets(data_args(tmp_path, "nobody-here/made-up-cifar-dataset-4821"))
    assert "python data_utils.py download cifar100-local" in str(raised.value)
    assert "--dataset_name cifar100-local" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no network traceback


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir/cifar", "no/such/nested/dir", "/no/*.parquet"])
def test_missing_local_path_gives_file_not_found(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="no such file or folder|matches no file"):
        load_raw_datasets(data_args(tmp_path, name))


def test_imagefolder_option_needs_an_existing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        load_raw_datasets(data_args(tmp_path, "imagefolder", data_dir=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------------------------------
# Validation, splitting, limits
# ---------------------------------------------------------------------------------------------------------------


def test_missing_column_lists_the_existing_ones(tmp_path):
    make_parquet_dataset(tmp_path / "data", rename={"img": "picture"})
    existing = r"\['picture', 'fine_label', 'coarse_label'\]"
    with pytest.raises(ValueError, match=rf"no column \['img'\].*{existing}.*--image_column_name"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data", image_column_name="img"), small_config(), seed=0)


def test_renamed_columns_work_through_the_options(tmp_path):
    make_parquet_dataset(tmp_path / "data", rename={"img": "picture", "fine_label": "y", "coarse_label": "super"})
    args = data_args(
        tmp_path,
        tmp_path / "data",
        image_column_name="picture",
        label_column_name="y",
        coarse_label_column_name="super",
        train_val_split=0.0,
    )
    assert_standard(prepare_datasets(args, small_config(), seed=0)["train"], list(range(NUM_FINE)))


def test_missing_coarse_column_is_derived_from_the_config(tmp_path):
    make_parquet_dataset(tmp_path / "data", drop_columns=("coarse_label",))
    prepared = prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.0), small_config(), seed=0)
    assert_standard(prepared["train"], list(range(NUM_FINE)))


def test_labels_out_of_range_name_the_count_and_a_row(tmp_path):
    labels = list(range(NUM_FINE))
    labels[7], labels[40], labels[41] = 100, -1, 250
    make_parquet_dataset(tmp_path / "data", fine_labels=labels, coarse_labels=[0] * NUM_FINE)
    message = (
        r"column 'fine_label' of split 'train' must be in \[0, 100\), got 100 at row 7 \(3 of 100 rows out of range\)"
    )
    with pytest.raises(ValueError, match=message):
        prepare_datasets(data_args(tmp_path, tmp_path / "data"), small_config(), seed=0)


def test_coarse_labels_disagreeing_with_the_config_are_counted(tmp_path):
    coarse = [CIFAR100_FINE_TO_COARSE[label] for label in range(NUM_FINE)]
    coarse[3] = (coarse[3] + 1) % 20
    coarse[90] = (coarse[90] + 1) % 20
    make_parquet_dataset(tmp_path / "data", fine_labels=list(range(NUM_FINE)), coarse_labels=coarse)
    with pytest.raises(ValueError, match=r"2 of 100 rows .* disagrees with config.fine_to_coarse; first: row 3 .*bear"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data"), small_config(), seed=0)


def test_empty_split_is_refused(tmp_path):
    make_parquet_dataset(tmp_path / "data", split="train")
    make_parquet_dataset(tmp_path / "data", split="test", rows_per_class=0)
    with pytest.raises(ValueError, match="split 'test' .* is empty"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data"), small_config(), seed=0)


def test_validation_split_is_reproducible_and_disjoint(tiny_parquet_dir, tmp_path):
    args = data_args(tmp_path, tiny_parquet_dir, train_val_split=0.25)

    def split_indices(seed):
        prepared = prepare_datasets(args, small_config(), seed=seed)
        return prepared["train"]["index"][:], prepared["validation"]["index"][:]

    train, validation = split_indices(seed=3)
    assert len(validation) == 50 and len(train) == 150
    assert not set(train) & set(validation) and set(train) | set(validation) == set(range(200))
    assert split_indices(seed=3) == (train, validation)
    assert split_indices(seed=4)[1] != validation


def test_max_samples_limit_each_split(tiny_parquet_dir, tmp_path):
    args = data_args(tmp_path, tiny_parquet_dir, max_train_samples=10, max_eval_samples=5, max_predict_samples=7)
    prepared = prepare_datasets(args, small_config(), seed=0)
    assert {split: len(dataset) for split, dataset in prepared.items()} == {"train": 10, "validation": 5, "test": 7}


@pytest.mark.parametrize(
    "option, value",
    [
        ("train_val_split", 1.0),
        ("train_val_split", -0.1),
        ("max_train_samples", -5),
        ("max_eval_samples", 0),
        ("augmentation", "cutout"),
        ("rotation_degrees", -1.0),
        ("mixup_alpha", -0.2),
        ("cutmix_alpha", -1.0),
        ("random_erasing", 1.5),
        ("mix_prob", -0.1),
        ("cutmix_switch_prob", 2.0),
    ],
)
def test_data_arguments_reject_bad_values(option, value):
    with pytest.raises(ValueError, match=f"{option} .*{value!r}"):
        DataArguments(**{option: value})


def test_data_arguments_parse_next_to_training_arguments(tmp_path):
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    argv = ["--output_dir", str(tmp_path), "--augmentation", "randaugment", "--no_horizontal_flip"]
    data, _ = parser.parse_args_into_dataclasses([*argv, "--max_train_samples", "8"])
    assert (data.augmentation, data.horizontal_flip, data.max_train_samples) == ("randaugment", False, 8)
    assert data.data_dir is None


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


def test_the_policies_of_the_option_are_the_policies_built():
    torchvision_policies = set(PolicyAugment.POLICIES)
    assert torchvision_policies < set(AUGMENTATION_POLICIES)  # the others run on batches
    for policy in AUGMENTATION_POLICIES:
        transform = build_train_transform(small_config(image_size=32), DataArguments(augmentation=policy))
        assert isinstance(transform, PolicyAugment if policy in torchvision_policies else BatchedAugment)
    assert DataArguments.__dataclass_fields__["augmentation"].metadata["help"] == (
        "Augmentation policy after crop and flip: 'original' (rotation + colour jitter), 'trivialaugment', "
        "'randaugment', 'autoaugment' (CIFAR-10 policy) or 'none'."
    )


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("policy", [*AUGMENTATION_POLICIES, "eval"])
def test_transform_output_shape_and_dtype(image_size, policy):
    config = small_config(image_size=image_size)
    if policy == "eval":
        transform = build_eval_transform(config)
    else:
        transform = build_train_transform(config, DataArguments(augmentation=policy, random_erasing=0.5))
    image = PIL.Image.fromarray(make_image_array(3, np.random.default_rng(0)))
    output = transform(image)
    assert output.shape == (3, image_size, image_size) and output.dtype == torch.float32
    mean, std = torch.tensor(config.image_mean).view(3, 1, 1), torch.tensor(config.image_std).view(3, 1, 1)
    pixels = output * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    if policy == "eval" and image_size == 32:  # at the source size: each pixel / 255, normalised
        expected = (torch.from_numpy(np.asarray(image)).permute(2, 0, 1) / 255.0 - mean) / std
        torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "I", "CMYK", "1", "large", "non-square"])
def test_transforms_accept_any_mode_and_size(mode):
    size = {"non-square": (48, 40), "large": 96}.get(mode, 32)
    array = make_image_array(5, np.random.default_rng(1), size)
    image = PIL.Image.fromarray(array)
    if mode == "I;16":
        image = PIL.Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 0
    elif mode not in ("large", "non-square"):
        image = image.convert(mode)
    config = small_config(image_size=64)
    for transform in (build_eval_transform(config), build_train_transform(config, DataArguments())):
        output = transform(image)
        assert output.shape == (3, 64, 64) and output.dtype == torch.float32


def test_sixteen_bit_images_are_scaled_to_eight_bits():
    grey = np.full((32, 32), 40000, dtype=np.uint16)
    output = build_eval_transform(small_config(image_size=32))(PIL.Image.fromarray(grey))
    expected = (round(40000 / 257) / 255 - 0.485) / 0.229
    assert output[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("source_size, image_size", [(32, 32), (32, 64), (32, 224), (96, 32)])
def test_eval_transform_matches_vit_image_processor(source_size, image_size):
    config = small_config(image_size=image_size)
    rng = np.random.default_rng(2)
    images = [PIL.Image.fromarray(make_image_array(label, rng, source_size)) for label in range(4)]
    processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=config.image_mean, image_std=config.image_std
    )
    expected = processor(images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([build_eval_transform(config)(image) for image in images])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=0.02, rtol=0)  # about 1/255 of a pixel value after normalising


def _augment(image_size: int = 32, **kwargs) -> BatchedAugment:
    return BatchedAugment(small_config(image_size=image_size), DataArguments(**kwargs))


def _unnormalise(pixels: torch.Tensor, config: HierarchicalEfficientNetV2Config) -> torch.Tensor:
    return pixels * torch.tensor(config.image_std).view(3, 1, 1) + torch.tensor(config.image_mean).view(3, 1, 1)


def test_batched_augment_crop_and_flip_shift_pixels_exactly():
    config, rng = small_config(image_size=32), np.random.default_rng(5)
    images = [torch.from_numpy(make_image_array(i, rng)).permute(2, 0, 1) for i in range(16)]
    seeds = list(range(100, 116))
    outputs = _augment(rotation_degrees=0, color_jitter=0).batch(images, seeds)
    draws = uniform_draws(seeds, 8)
    for image, output, draw in zip(images, outputs, draws, strict=True):
        dx, dy = (torch.floor(draw[:2] * 9) - 4).long().tolist()  # 4 px of padding at 32 px
        padded = torch.nn.functional.pad(image.float() / 255, (4, 4, 4, 4))
        expected = padded[:, 4 + dy : 36 + dy, 4 + dx : 36 + dx]
        if draw[2] < 0.5:
            expected = expected.flip(-1)
        torch.testing.assert_close(_unnormalise(output, config), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 3])  # +28 and -26 degrees
def test_batched_augment_rotation_matches_torchvision(seed):
    from torchvision.transforms.v2 import functional as F

    config = small_config(image_size=32)
    image = torch.from_numpy(make_image_array(3, np.random.default_rng(6))).permute(2, 0, 1)
    augment = _augment(random_crop=False, horizontal_flip=False, rotation_degrees=30, color_jitter=0)
    angle = float((2 * uniform_draws([seed], 8)[0, 3] - 1) * 30)
    ours = _unnormalise(augment.batch([image], [seed])[0], config)
    reference = F.rotate(image.float() / 255, angle, interpolation=F.InterpolationMode.BILINEAR)
    assert abs(angle) > 20
    inner = (slice(None), slice(6, 26), slice(6, 26))  # away from the corners, where the fills differ by a pixel
    torch.testing.assert_close(ours[inner], reference[inner], atol=1e-4, rtol=0)


def test_batched_augment_jitter_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    config, rng = small_config(image_size=32), np.random.default_rng(7)
    augment = _augment(random_crop=False, horizontal_flip=False, rotation_degrees=0, color_jitter=0.4)
    images = [torch.from_numpy(make_image_array(i, rng)).permute(2, 0, 1) for i in range(12)]
    seeds = list(range(12))
    outputs = augment.batch(images, seeds)
    draws = uniform_draws(seeds, 8)
    functions = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    orders = set()
    for image, output, draw in zip(images, outputs, draws, strict=True):
        factors = (0.6 + draw[4:7] * 0.8).tolist()
        order = JITTER_ORDERS[int(draw[7] * 6)].tolist()
        orders.add(tuple(order))
        expected = image.float() / 255
        for op in order:
            expected = functions[op](expected, factors[op])
        torch.testing.assert_close(_unnormalise(output, config), expected, atol=1e-4, rtol=0)
    assert len(orders) > 2  # the order is drawn per image


def test_batched_augment_handles_sizes_and_modes_per_image():
    augment, rng = _augment(64, random_erasing=0.5), np.random.default_rng(8)
    images = [torch.from_numpy(make_image_array(i, rng, size)).permute(2, 0, 1) for i, size in enumerate([32, 48, 32])]
    together = augment.batch(images, [1, 2, 3])
    for position, image in enumerate(images):
        alone = augment.batch([image], [position + 1])[0]
        assert together[position].shape == (3, 64, 64)
        torch.testing.assert_close(together[position], alone, atol=1e-6, rtol=0)
    assert isinstance(
        build_train_transform(small_config(image_size=32), DataArguments(augmentation="none")), BatchedAugment
    )


def test_uniform_draws_are_a_function_of_the_seed():
    draws = uniform_draws([1, 2, 2**62], 8)
    assert draws.shape == (3, 8) and draws.dtype == torch.float64 and ((draws >= 0) & (draws < 1)).all()
    torch.testing.assert_close(uniform_draws([2], 8)[0], draws[1], atol=0, rtol=0)
    big = uniform_draws(list(range(20000)), 1).flatten()
    assert abs(big.mean().item() - 0.5) < 0.01 and len(set(big.tolist())) == 20000


def _train_transform(seed: int = 7, **kwargs) -> ImageTransform:
    return ImageTransform(build_train_transform(small_config(image_size=32), DataArguments(**kwargs)), seed=seed)


def _encoded_batch(indices: list[int]) -> dict[str, list]:
    rng = np.random.default_rng(4)
    images = [{"bytes": encode_image(PIL.Image.fromarray(make_image_array(i, rng))), "path": None} for i in indices]
    coarse = [CIFAR100_FINE_TO_COARSE[i] for i in indices]
    return {"image": images, "labels": indices, "coarse_labels": coarse, "index": indices}


def _split_examples(output: dict[str, list]) -> list[dict]:
    """The examples of a batch transform's output, as `Dataset.__getitems__` gives them to a collator."""
    return [{key: values[i] for key, values in output.items()} for i in range(len(output["index"]))]


def _model_inputs(output: dict[str, list], image_size: int = 32) -> list[torch.Tensor]:
    """Each image of a batch transform's output as the model gets it: collated, then preprocessed."""
    batch = HierarchicalCollator(small_config(image_size=image_size))(_split_examples(output))
    return list(DevicePreprocessor(small_config(image_size=image_size))(batch)["pixel_values"])


def test_image_transform_output_keys():
    output = ImageTransform(build_eval_transform(small_config(image_size=32)))(_encoded_batch([0, 1, 2]))
    assert sorted(output) == ["coarse_labels", "index", "labels", "pixel_values"]
    assert len(output["pixel_values"]) == 3 and output["labels"] == [0, 1, 2]
    assert "epoch" in _train_transform()(_encoded_batch([0]))


@pytest.mark.parametrize("policy", ["trivialaugment", "original"])
def test_train_transform_is_seeded_by_seed_epoch_and_index_only(policy):
    batch = _encoded_batch([0, 1, 2, 3])
    transform = _train_transform(augmentation=policy, random_erasing=0.5)
    torch.manual_seed(0)
    first = _model_inputs(transform(batch))
    state = torch.get_rng_state()
    torch.manual_seed(12345)
    torch.rand(100)
    again = _model_inputs(transform(batch))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # one row alone, in a different batch position, gets the same augmentation
    alone = _model_inputs(transform({key: values[2:3] for key, values in batch.items()}))[0]
    assert torch.equal(alone, first[2])
    # the global RNG is left as it was
    torch.manual_seed(0)
    transform(batch)
    assert torch.equal(torch.get_rng_state(), state)
    # another epoch or seed draws differently
    transform.set_epoch(1)
    assert not any(torch.equal(a, b) for a, b in zip(first, _model_inputs(transform(batch)), strict=True))
    other_seed = _train_transform(seed=8, augmentation=policy, random_erasing=0.5)
    assert not all(torch.equal(a, b) for a, b in zip(first, _model_inputs(other_seed(batch)), strict=True))


def test_image_transform_survives_pickling():
    transform = _train_transform()
    transform.set_epoch(3)
    batch = _encoded_batch([5, 6])
    restored = pickle.loads(pickle.dumps(transform))
    for a, b in zip(_model_inputs(transform(batch)), _model_inputs(restored(batch)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["truncated", "not_an_image", "empty"])
def test_undecodable_image_names_the_row(tmp_path, bad):
    png = encode_image(PIL.Image.fromarray(make_image_array(0, np.random.default_rng(0))))
    payload = {"truncated": png[: len(png) // 2], "not_an_image": b"hello, not a picture", "empty": b""}[bad]
    make_parquet_dataset(tmp_path / "data", image_bytes={42: payload})
    args = data_args(tmp_path, tmp_path / "data", train_val_split=0.0)
    config = small_config(image_size=32)
    transformed = apply_transforms(prepare_datasets(args, config, seed=0), config, args, seed=0)
    assert transformed["train"][41]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="row index=42 of split 'train'"):
        transformed["train"][40:44]


def test_decode_image_passes_pil_images_through():
    image = PIL.Image.new("RGB", (8, 8))
    assert decode_image(image, 0) is image


def test_apply_transforms_and_epoch_callback(tiny_parquet_dir, tmp_path):
    args = data_args(tmp_path, tiny_parquet_dir, max_train_samples=8)
    config = small_config(image_size=32)
    prepared = prepare_datasets(args, config, seed=0)
    transformed = apply_transforms(prepared, config, args, seed=0)
    train, test = transformed["train"], transformed["test"]
    assert sorted(train[0]) == ["augmentation", "coarse_labels", "epoch", "index", "labels", "pixel_values"]
    # an evaluation row decodes to the source image's 8-bit RGB pixels, (3, H, W)
    source = torch.from_numpy(np.asarray(prepared["test"][3]["image"].convert("RGB"))).permute(2, 0, 1)
    assert "epoch" not in test[3] and torch.equal(test[3]["pixel_values"], source)
    preprocess, collate = DevicePreprocessor(config), HierarchicalCollator(config)
    epoch0 = preprocess(collate([train[0]]))["pixel_values"]
    callback, training_args = EpochCallback(train), TrainingArguments(output_dir=str(tmp_path))
    for fractional, expected in ((0.0, 0), (1.0, 1), (2.4999, 2), (2.9999999999, 3)):
        callback.on_epoch_begin(training_args, TrainerState(epoch=fractional), TrainerControl())
        assert train[0]["epoch"] == expected
    callback.on_epoch_begin(training_args, TrainerState(epoch=0.5), TrainerControl())
    assert torch.equal(preprocess(collate([train[0]]))["pixel_values"], epoch0)


def test_dataloader_workers_see_the_same_augmentations(tiny_parquet_dir, tmp_path):
    args = data_args(tmp_path, tiny_parquet_dir, max_train_samples=12, mixup_alpha=0.5, cutmix_alpha=1.0)
    config = small_config(image_size=32)
    train = apply_transforms(prepare_datasets(args, config, seed=0), config, args, seed=0)["train"]
    EpochCallback(train).on_epoch_begin(TrainingArguments(output_dir=str(tmp_path)), TrainerState(epoch=2.0), None)
    collator = HierarchicalCollator(config, args.mixup_alpha, args.cutmix_alpha, seed=0)

    def batches(num_workers):
        loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=num_workers, collate_fn=collator)
        return [DevicePreprocessor(config)(batch) for batch in loader]

    for in_process, in_worker in zip(batches(0), batches(2), strict=True):
        assert all(torch.equal(in_process[key], in_worker[key]) for key in in_process)
        assert in_process["labels"].shape == (4, 100)


def test_epoch_callback_refuses_targets_without_set_epoch():
    with pytest.raises(TypeError, match="set_epoch"):
        EpochCallback([object()])


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------


def _examples(batch_size: int = 8, image_size: int = 32, epoch: int | None = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for index in range(batch_size):
        label = (index * 13) % NUM_FINE
        example = {
            "pixel_values": torch.randn(3, image_size, image_size, generator=generator),
            "labels": label,
            "coarse_labels": CIFAR100_FINE_TO_COARSE[label],
            "index": index,
        }
        if epoch is not None:
            example["epoch"] = epoch
        examples.append(example)
    return examples


def test_collator_stacks_hard_labels():
    batch = HierarchicalCollator()(_examples(epoch=None))
    assert sorted(batch) == ["coarse_labels", "labels", "pixel_values"]
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous()
    assert torch.equal(batch["pixel_values"], torch.stack([example["pixel_values"] for example in _examples()]))
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [(i * 13) % NUM_FINE for i in range(8)]
    assert batch["coarse_labels"].tolist() == [CIFAR100_FINE_TO_COARSE[label] for label in batch["labels"].tolist()]


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_collator_mixes_fine_and_coarse_targets_alike(mixup_alpha, cutmix_alpha):
    config = small_config(image_size=32)
    collator = HierarchicalCollator(config, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, seed=1)
    preprocess = DevicePreprocessor(config)
    examples = _examples(batch_size=16)
    batch = preprocess(collator(examples))
    assert batch["labels"].shape == (16, 100) and batch["coarse_labels"].shape == (16, 20)
    assert batch["labels"].dtype == batch["coarse_labels"].dtype == batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["coarse_labels"], batch["labels"] @ config.hierarchy_matrix())
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(16))
    torch.testing.assert_close(batch["coarse_labels"].sum(1), torch.ones(16))
    assert (batch["labels"] > 0).sum(1).max() == 2  # two classes mixed per row
    assert not torch.equal(batch["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    # reproducible from (seed, epoch, indices), independent of the global RNG; another epoch draws differently
    torch.manual_seed(99)
    again = preprocess(collator(_examples(batch_size=16)))
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    assert not torch.equal(preprocess(collator(_examples(batch_size=16, epoch=1)))["labels"], batch["labels"])


def test_collator_never_mixes_evaluation_examples():
    collator = HierarchicalCollator(small_config(image_size=32), mixup_alpha=1.0, cutmix_alpha=1.0)
    examples = _examples(epoch=None)
    batch = DevicePreprocessor(small_config(image_size=32))(collator(examples))
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (8,)
    assert torch.equal(batch["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))


def test_collator_with_mix_prob_zero_gives_one_hot_targets():
    config = small_config(image_size=32)
    examples = _examples()
    batch = DevicePreprocessor(config)(HierarchicalCollator(config, mixup_alpha=1.0, mix_prob=0.0)(examples))
    labels = torch.tensor([e["labels"] for e in examples])
    assert torch.equal(batch["labels"], torch.nn.functional.one_hot(labels, 100).float())
    assert torch.equal(batch["coarse_labels"], batch["labels"] @ config.hierarchy_matrix())


def test_collator_needs_the_config_to_mix():
    with pytest.raises(ValueError, match="config"):
        HierarchicalCollator(mixup_alpha=0.2)
    assert (
        pickle.loads(pickle.dumps(HierarchicalCollator(small_config(image_size=32), cutmix_alpha=1.0))).cutmix_alpha
        == 1.0
    )
