"""The training recipe's ingredients: weight averaging, recipe files, soft targets through the model."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import small_config
from data_utils import HierarchicalCollator
from hierarchical.data.device_preprocess import DevicePreprocessor
from hierarchical.training.callbacks import EMA_FILE, EMACallback
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import parse_args

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_ema_value_after_two_steps_by_hand():
    # decay 0.9; the weight starts at w0 (the shadow too), then becomes w0 + 1 and w0 + 3:
    #   after step 1: 0.9 * w0 + 0.1 * (w0 + 1) = w0 + 0.1
    #   after step 2: 0.9 * (w0 + 0.1) + 0.1 * (w0 + 3) = w0 + 0.09 + 0.3 = w0 + 0.39
    # and BatchNorm's running mean likewise (0 -> 2 -> 2): 0.2, then 0.9 * 0.2 + 0.1 * 2 = 0.38.
    model = TinyNet()
    args = SimpleNamespace(device="cpu")
    ema = EMACallback(decay=0.9)
    ema.on_train_begin(args, None, None, model=model)
    start = model.linear.weight.detach().clone()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.norm.running_mean.fill_(2.0)
    ema.on_step_end(args, None, None, model=model)
    with torch.no_grad():
        model.linear.weight.add_(2.0)
    ema.on_step_end(args, None, None, model=model)
    torch.testing.assert_close(ema.shadow["linear.weight"], start + 0.39)
    torch.testing.assert_close(ema.shadow["norm.running_mean"], torch.full_like(model.norm.running_mean, 0.38))


def test_ema_tracks_saves_restores_and_finalises(tmp_path):
    model = TinyNet()
    args = SimpleNamespace(device="cpu", output_dir=str(tmp_path), should_save=True, load_best_model_at_end=False)
    state = SimpleNamespace(global_step=1, best_model_checkpoint=None)
    ema = EMACallback(decay=0.9)
    ema.on_train_begin(args, state, None, model=model)
    start = model.linear.weight.detach().clone()
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    ema.on_step_end(args, state, None, model=model)
    torch.testing.assert_close(ema.shadow["linear.weight"], start + 0.1)
    assert "norm.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged

    with ema.applied(model):  # evaluation sees the average, training resumes with its own weights
        torch.testing.assert_close(model.linear.weight, start + 0.1)
    torch.testing.assert_close(model.linear.weight, start + 1.0)

    (tmp_path / "checkpoint-1").mkdir()
    ema.on_save(args, state, None, model=model)
    assert (tmp_path / "checkpoint-1" / EMA_FILE).is_file()
    resumed = EMACallback(decay=0.9, resume_from=str(tmp_path / "checkpoint-1"))
    resumed.on_train_begin(args, state, None, model=TinyNet())
    for name, value in ema.shadow.items():
        assert torch.equal(resumed.shadow[name], value), name

    resumed.on_train_end(args, state, None, model=model)
    torch.testing.assert_close(model.linear.weight, start + 0.1)


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_files_parse(recipe):
    model_args, data_args, training_args = parse_args([str(recipe)])
    assert training_args.do_train and training_args.do_eval
    assert training_args.lr_conv > 0 and training_args.lr_fc > 0
    assert model_args.image_size in (32, 384)


def test_mixed_batches_train_both_heads_with_consistent_soft_targets():
    config = small_config()
    collator = HierarchicalCollator(config, mixup_alpha=0.4, cutmix_alpha=1.0, seed=3)
    examples = [
        {"pixel_values": torch.randn(3, 32, 32), "labels": label, "coarse_labels": config.fine_to_coarse[label],
         "index": i, "epoch": 0}
        for i, label in enumerate([4, 95, 47, 26, 0, 1, 2, 3])
    ]  # fmt: skip
    batch = DevicePreprocessor(config)(collator(examples))  # the mixing drawn by the collator, applied
    assert batch["labels"].shape == (8, 100) and batch["coarse_labels"].shape == (8, 20)
    torch.testing.assert_close(batch["coarse_labels"], batch["labels"] @ config.hierarchy_matrix())
    model = HierarchicalEfficientNetV2ForImageClassification(config).train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.coarse_classifier.weight.grad.abs().sum() > 0
