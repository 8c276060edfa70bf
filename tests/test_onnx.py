"""Tests of the ONNX export (`python -m hierarchical.export_onnx`, `hierarchical/training/onnx_export.py`): both heads
with a free batch size, the check against PyTorch, predictions with ONNX Runtime, and the messages for bad input and
missing extras."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import run_script, small_config
from hierarchical.training.onnx_export import (
    INSTALL_COMMAND,
    ONNX_FILE,
    OnnxHierarchicalClassifier,
    check_images,
    check_onnx_model,
    cli,
    import_extra,
    main,
)
from modeling_hierarchical import (
    BACKBONE_CHANNELS,
    HierarchicalEfficientNetV2ForImageClassification,
    build_image_processor,
)

ONNX_EXTRAS = ("onnx", "onnxscript", "onnxruntime")
SKIP_REASON = f"the ONNX extras are not installed ({INSTALL_COMMAND})"


def informative_model() -> HierarchicalEfficientNetV2ForImageClassification:
    """A random 32 px model whose predictions differ between images, with stored temperatures and a selective
    threshold: a fresh backbone's pooled features are ~1e-7, so the heads' weights on them are scaled to give logits
    of a few units (linear: rounding errors stay relative)."""
    torch.manual_seed(0)
    config = small_config(fine_temperature=1.5, coarse_temperature=0.8, selective_threshold=0.4)
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    with torch.no_grad():
        model.coarse_classifier.weight.mul_(1e7)
        model.fine_classifier.weight[:, :BACKBONE_CHANNELS].mul_(1e7)  # not the columns of the coarse logits
    return model


def generated_images(count: int, seed: int = 1) -> list[PIL.Image.Image]:
    """`count` 32x32 images of random pixels."""
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, HierarchicalEfficientNetV2ForImageClassification, object]:
    """The informative model saved with its image processor, exported by `hierarchical.export_onnx`'s `main`: (folder,
    model, the check `main` returned)."""
    for name in ONNX_EXTRAS:
        pytest.importorskip(name, reason=SKIP_REASON)
    folder = tmp_path_factory.mktemp("onnx") / "model"
    model = informative_model()
    model.save_pretrained(folder)
    build_image_processor(model.config).save_pretrained(folder)
    check = main([str(folder), "--num_images", "8"])
    return folder, model, check


@pytest.fixture(scope="module")
def classifier(exported) -> OnnxHierarchicalClassifier:
    """The exported model loaded for predictions with ONNX Runtime (one thread)."""
    return OnnxHierarchicalClassifier.from_pretrained(exported[0], threads=1)


@pytest.mark.slow
def test_export_writes_both_heads_with_a_free_batch_size(exported, classifier):
    _, model, _ = exported
    session = classifier.session
    assert [output.name for output in session.get_outputs()] == ["logits", "coarse_logits"]
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    for batch in (1, 5):
        pixel_values = torch.randn(batch, 3, 32, 32)
        logits, coarse_logits = session.run(None, {"pixel_values": pixel_values.numpy()})
        with torch.no_grad():
            expected = model(pixel_values)
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(coarse_logits, expected.coarse_logits.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_checks_itself_against_pytorch(exported):
    _, model, check = exported
    assert check.passed
    assert check.max_abs_diff <= 1e-4
    assert check.agreements == {"class": 8, "superclass": 8, "selective answer": 8}
    assert check.threshold == model.config.selective_threshold


@pytest.mark.slow
def test_a_second_export_replaces_the_file_only_with_overwrite(exported, capsys):
    folder = exported[0]
    before = (folder / ONNX_FILE).stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        cli([str(folder), "--num_images", "2"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {str(folder / ONNX_FILE)!r} exists: pass --overwrite to replace it"
    )
    assert (folder / ONNX_FILE).stat().st_mtime_ns == before
    assert main([str(folder), "--num_images", "2", "--overwrite"]).passed
    assert (folder / ONNX_FILE).stat().st_mtime_ns > before
    assert "input pixel_values (batch, 3, 32, 32), outputs logits, coarse_logits." in capsys.readouterr().out


@pytest.mark.slow
def test_check_fails_when_onnx_and_pytorch_differ(exported, classifier):
    changed = copy.deepcopy(exported[1])
    with torch.no_grad():
        changed.fine_classifier.bias[3] += 50.0  # class 3 wins everywhere in PyTorch, not in the ONNX model
    pixel_values = classifier.image_processor(images=generated_images(6), return_tensors="pt")["pixel_values"]
    check = check_onnx_model(changed, classifier, pixel_values)
    assert not check.passed
    assert check.max_abs_diff > 1.0
    assert check.agreements["class"] < 6


@pytest.mark.slow
def test_onnx_classifier_answers_as_the_model_does(exported, classifier):
    model = exported[1]
    images = generated_images(12)
    assert type(classifier.session).__module__.startswith("onnxruntime")
    onnx_prediction = classifier(images)
    pixel_values = build_image_processor(model.config)(images=images, return_tensors="pt")["pixel_values"]
    expected = model.predict_hierarchical(pixel_values)
    # the images get different classes and answers at different levels: the comparison says something
    assert len(set(expected.fine_labels)) > 1 and len(set(expected.answer_levels)) > 1
    assert onnx_prediction.fine_labels == expected.fine_labels
    assert onnx_prediction.coarse_labels == expected.coarse_labels
    assert onnx_prediction.answer_labels == expected.answer_labels
    images[0].save(exported[0].parent / "one.png")
    for one in (images[0], str(exported[0].parent / "one.png"), exported[0].parent / "one.png"):
        assert classifier(one).answer_labels == expected.answer_labels[:1]  # one image or file: a batch of one
    with pytest.raises(ValueError, match="images must hold at least one image"):
        classifier([])
    assert onnx_prediction.answer_levels == expected.answer_levels
    torch.testing.assert_close(onnx_prediction.fine_scores, expected.fine_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(onnx_prediction.answer_scores, expected.answer_scores, atol=1e-5, rtol=0)


def test_onnx_classifier_needs_the_exported_file(saved_model_dir):
    with pytest.raises(
        ValueError, match=r"model\.onnx' does not exist: write it with python -m hierarchical\.export_onnx "
    ):
        OnnxHierarchicalClassifier.from_pretrained(saved_model_dir)


@pytest.mark.parametrize("name", ONNX_EXTRAS)
def test_missing_extra_names_the_install_command(monkeypatch, capsys, saved_model_dir, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    with pytest.raises(ImportError, match=rf"'{name}'.*pip install -r requirements-onnx\.txt"):
        import_extra(name)
    with pytest.raises(SystemExit) as exit_info:
        cli([str(saved_model_dir)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: ") and INSTALL_COMMAND in error
    assert not (saved_model_dir / ONNX_FILE).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "error: MODEL_DIR '{missing}' is not a folder"),
        (["{empty}"], "error: MODEL_DIR '{empty}' is not a saved model: it has no config.json"),
        (["{model}", "--images", "{missing}"], "error: --images '{missing}' does not exist"),
        (["{model}", "--images", "{empty}"], "error: --images '{empty}' holds no image file"),
        (["{model}", "--num_images", "0"], "error: --num_images must be >= 1, got 0"),
    ],
)
def test_bad_input_ends_with_one_error_line(tmp_path, capsys, saved_model_dir, argv, message):
    for name in ONNX_EXTRAS:
        pytest.importorskip(name, reason=SKIP_REASON)
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path), "model": str(saved_model_dir)}
    with pytest.raises(SystemExit) as exit_info:
        cli([part.format(**paths) for part in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(message.format(**paths))
    assert not (saved_model_dir / ONNX_FILE).exists()


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12,000 x 12,000 1-bit PNG of 17 KB: 144 megapixels, above the default limit of 50 million."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    PIL.Image.new("1", (12_000, 12_000)).save(path)
    return path


@pytest.mark.slow
def test_onnx_classifier_refuses_an_image_above_the_limit_from_its_header(classifier, huge_png):
    for image in (str(huge_png), PIL.Image.open(huge_png)):  # a path, and a PIL image not decoded yet
        with pytest.raises(ValueError, match="is 12000x12000 = 144,000,000 pixels, above the limit of 50,000,000"):
            classifier([image])


@pytest.mark.slow  # a fresh process imports torch and transformers
def test_export_script_refuses_a_missing_folder(tmp_path):
    result = run_script("-m", "hierarchical.export_onnx", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_check_images_spread_over_folders_or_generated(tmp_path):
    for superclass in ("a", "b"):
        for row in range(5):
            folder = tmp_path / superclass
            folder.mkdir(exist_ok=True)
            PIL.Image.new("L", (8, 6), row * 40).save(folder / f"{row}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images, source = check_images([str(tmp_path)], count=4, image_size=32)
    assert len(images) == 4 and {image.mode for image in images} == {"RGB"}
    assert source == "4 images of 10 from --images"
    images, source = check_images([], count=3, image_size=32)
    assert [image.size for image in images] == [(32, 32)] * 3 and "generated" in source
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"--images file '.*broken\.png'.* is not an image"):
        check_images([str(tmp_path / "a")], count=10, image_size=32)
    # the model's decoder reads them: a file above the pixel limit is refused from its header, before decoding
    PIL.Image.new("L", (40, 30)).save(tmp_path / "b" / "large.png")
    with pytest.raises(ValueError, match=r"--images file '.*large\.png' is 40x30 = 1,200 pixels, above the limit"):
        check_images([str(tmp_path / "b")], count=10, image_size=32, max_pixels=1000)


def test_an_image_above_the_saved_processors_pixel_limit_ends_with_one_error_line(tmp_path, capsys, saved_model_dir):
    for name in ONNX_EXTRAS:
        pytest.importorskip(name, reason=SKIP_REASON)
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model_dir, model_dir)
    processor_file = model_dir / "preprocessor_config.json"
    processor_config = json.loads(processor_file.read_text())
    processor_file.write_text(json.dumps(processor_config | {"max_image_pixels": 1000}))
    PIL.Image.new("RGB", (40, 30)).save(tmp_path / "large.png")
    with pytest.raises(SystemExit) as exit_info:
        cli([str(model_dir), "--images", str(tmp_path / "large.png")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert error.startswith(
        f"error: the image of --images file {str(tmp_path / 'large.png')!r} is 40x30 = 1,200 pixels"
    )
    assert not (model_dir / ONNX_FILE).exists()  # refused before the export
