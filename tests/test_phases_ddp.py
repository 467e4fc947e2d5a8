"""Fine-tuning phases under DDP (2 CPU processes over gloo): the ranks stay identical through an unfreeze and
match a single process that sees the same global batches."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_phases import run
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from tlkit.backbones import create_backbone
from tlkit.callbacks import TimmSyncBatchNorm

SCRIPT = Path(__file__).with_name("_ddp_phases.py")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_ddp_ranks_stay_identical_and_match_one_process_through_unfreezing(tmp_path: Path, adapter: str | None) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(SCRIPT), str(tmp_path), "2", *([adapter] if adapter else [])]
    subprocess.run(command, check=True, timeout=600, env=env)
    ranks = [torch.load(tmp_path / f"devices2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = run(1, tmp_path, adapter)
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for epoch, (rank0, rank1, one) in enumerate(zip(*ranks, single, strict=True)):
        for name, value in rank0.items():
            assert torch.equal(value, rank1[name]), f"epoch {epoch}: ranks differ in {name}"
            torch.testing.assert_close(value, one[name], rtol=1e-4, atol=1e-6, msg=f"epoch {epoch}: {name}")
    if adapter:  # the pretrained weights never train; the adapter of the stem trains once phase 3 unfreezes it
        base = [name for name in single[0] if ".base_layer." in name]
        assert base and all(torch.equal(single[0][name], single[2][name]) for name in base)
        stem = "backbone.model.conv_stem.lora_B.default.weight"
    else:
        stem = "backbone.model.conv_stem.weight"
    history = [single[0][stem], *[epoch[stem] for epoch in single]]
    assert torch.equal(history[0], history[2]) and not torch.equal(history[2], history[3])  # unfrozen in phase 3


def test_timm_sync_batchnorm_keeps_the_fused_activation_and_reverts() -> None:
    model = create_backbone("test_efficientnet").eval()
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    # Why the plugin exists: Lightning's sync_batchnorm=True converts timm's BatchNormAct2d to a plain SyncBatchNorm.
    # (its forward skips the activation), so the network computes something else. Eval mode runs on CPU.
    plain = TorchSyncBatchNorm().apply(copy.deepcopy(model))
    assert not torch.allclose(plain(images), expected)
    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(copy.deepcopy(model))
    norms = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert norms and all(isinstance(m, SyncBatchNormAct) for m in norms)
    torch.testing.assert_close(synced(images), expected)
    reverted = plugin.revert(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    assert all(isinstance(m, BatchNormAct2d) for m in reverted.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(reverted(images), expected)
