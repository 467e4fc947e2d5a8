"""The zoo sweep's harness (benchmarks/zoo.py): its per-model checks pass on models tlkit handles, and each one fails
when the behaviour it checks is broken (frozen parameters that train, BatchNorm statistics that move, a stage
partition with a hole, features that are not the pre-logits, a BatchNorm fold that changes the output)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo  # noqa: E402

import tlkit.export  # noqa: E402
import tlkit.module  # noqa: E402
from tlkit.backbones import Backbone, create_backbone  # noqa: E402
from tlkit.features import FeatureExtractor  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def statuses(record: dict) -> dict[str, str]:
    return {check: result["status"] for check, result in record["checks"].items()}


def test_cnn_passes_every_check_with_time_and_memory():
    record = zoo.check_model("test_resnet")
    assert statuses(record) == dict.fromkeys(zoo.CHECKS, zoo.PASS), record
    assert zoo.outcome(record) == zoo.PASS
    assert record["input_size"] == 32  # the smallest candidate size that runs
    assert record["time_s"] > 0 and record["cpu_s"] > 0 and record["peak_rss_mb"] > 100


def test_fixed_size_transformer_uses_its_input_size_and_skips_onnx():
    record = zoo.check_model("test_vit")
    assert record["input_size"] == 160  # test_vit is fixed-size: its pretrained_cfg input_size
    assert record["checks"]["onnx"] == {"status": zoo.NA, "reason": "no BatchNorm"}
    assert all(s == zoo.PASS for c, s in statuses(record).items() if c != "onnx"), record
    assert "pool=token" in record["checks"]["features"]["note"]  # a ViT's own pool: the class token


def test_torchvision_pre_logits_come_from_the_full_model():
    record = zoo.check_model("torchvision/resnet18")
    assert statuses(record)["features"] == zoo.PASS, record
    assert record["input_size"] == 32


def test_frozen_parameters_that_train_fail_the_freeze_checks(monkeypatch):
    monkeypatch.setattr(tlkit.module, "apply_freeze", lambda module, frozen: None)  # nothing gets frozen
    record = zoo.check_model("test_resnet")
    assert statuses(record)["freeze_backbone"] == zoo.FAIL
    assert "trainable but should be frozen" in record["checks"]["freeze_backbone"]["reason"]
    assert statuses(record)["freeze_stages1"] == zoo.FAIL


def test_moving_frozen_batchnorm_statistics_fail_the_freeze_checks(monkeypatch):
    monkeypatch.setattr(tlkit.module, "keep_frozen_bn_eval", lambda module: None)  # frozen BN layers train
    record = zoo.check_model("test_resnet")
    assert statuses(record)["freeze_backbone"] == zoo.FAIL
    assert "running_mean" in record["checks"]["freeze_backbone"]["reason"]


def test_the_freeze_checks_digest_tells_one_changed_bit_and_nothing_else():
    t = torch.randn(5, 3)
    t[0, 0] = float("nan")
    assert zoo.fingerprint(t) == zoo.fingerprint(t.clone())  # NaN compares equal to itself here, unlike torch.equal
    nudged = t.clone()
    nudged[2, 1] = torch.nextafter(nudged[2, 1], torch.tensor(float("inf")))  # the smallest step a weight can take
    assert zoo.fingerprint(nudged) != zoo.fingerprint(t)
    assert zoo.fingerprint(t.reshape(3, 5)) != zoo.fingerprint(t)  # same bytes, another shape
    assert zoo.fingerprint(t.t()) == zoo.fingerprint(t.t().contiguous())  # a strided view is read as its values
    assert zoo.fingerprint(torch.tensor(3)) != zoo.fingerprint(torch.tensor(4))  # a BatchNorm's num_batches_tracked
    assert zoo.fingerprint(torch.tensor(3)) != zoo.fingerprint(torch.tensor(3.0))


def test_the_step_taken_during_backward_is_one_ordinary_optimizer_step():
    from tlkit import TransferClassifier
    from tlkit.optim import create_optimizer, param_groups

    torch.manual_seed(0)
    clf = TransferClassifier(backbone="test_vit", pretrained=False, num_classes=zoo.NUM_CLASSES)
    clf.set_freeze("stages:1")
    reference = TransferClassifier(backbone="test_vit", pretrained=False, num_classes=zoo.NUM_CLASSES)
    reference.load_state_dict(clf.state_dict())
    reference.set_freeze("stages:1")
    x = torch.rand(zoo.BATCH, 3, 160, 160)

    before = {k: v.clone() for k, v in clf.state_dict().items()}
    zoo._optimizer_step(clf, x)
    groups = param_groups(reference.named_parameters(), weight_decay=1e-2, base_lr=0.1)  # a decayed and a 0 group
    assert {g["weight_decay"] for g in groups} == {1e-2, 0.0}
    optimizer = create_optimizer(groups, "sgd", lr=0.1, momentum=0.0)
    reference.train()
    torch.nn.functional.cross_entropy(reference(x), torch.arange(len(x)) % zoo.NUM_CLASSES).backward()
    optimizer.step()

    after, expected = clf.state_dict(), reference.state_dict()
    assert all(torch.allclose(after[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == trainable  # every trainable tensor took the step (the equality above is not a no-op)
    assert all(p.grad is None for p in clf.parameters())  # each gradient freed once used: the memory saving


def test_a_model_whose_weights_alone_are_over_the_cap_is_excluded_without_building_it(monkeypatch):
    assert 44 < zoo.weights_mb("resnet18") < 46  # 11.7M float32 parameters and the BatchNorm buffers
    assert zoo.weights_mb("torchvision/resnet18") == pytest.approx(zoo.weights_mb("resnet18"), rel=0.01)
    assert zoo.outcome(zoo.check_model("test_vit", max_weights_mb=40)) == zoo.PASS  # under the cap: checked
    monkeypatch.setattr(zoo, "_run", lambda *a: pytest.fail("built"))
    record = zoo.check_model("resnet18", max_weights_mb=40)
    assert zoo.outcome(record) == "excluded"
    assert re.fullmatch(r"memory: float32 weights alone [\d.]+ GB, over the \d+ GB cap", record["excluded"])
    assert {c["status"] for c in record["checks"].values()} == {zoo.NA}


def test_a_data_config_before_the_build_that_differs_fails_the_build(monkeypatch):
    import tlkit

    regnet = "torchvision/regnet_x_400mf"  # its builder cannot run on the meta device
    zoo._check_config_before_build(regnet, create_backbone(regnet))
    monkeypatch.setattr(tlkit, "backbone_data_config", lambda name: {"input_size": (3, 1, 1)})
    record = zoo.check_model("test_resnet")
    assert statuses(record)["build"] == zoo.FAIL
    assert (
        "backbone_data_config gives {'input_size': (3, 1, 1)}, the built backbone {"
        in record["checks"]["build"]["reason"]
    )


def test_stage_partition_with_a_hole_fails(monkeypatch):
    original = Backbone.stage_params
    monkeypatch.setattr(Backbone, "stage_params", lambda self: {s: p[1:] for s, p in original(self).items()})
    record = zoo.check_model("test_resnet")
    assert statuses(record)["stages"] == zoo.FAIL
    assert "in none" in record["checks"]["stages"]["reason"]


def test_stages_out_of_forward_order_fail():
    backbone = tlkit.create_backbone("test_resnet")
    params = backbone.stage_params()
    names = list(params)
    swapped = {names[0]: params[names[0]], names[2]: params[names[2]], names[1]: params[names[1]]}
    swapped |= {n: params[n] for n in names[3:]}
    backbone.stage_params = lambda: swapped
    with pytest.raises(zoo.CheckFailed, match="order"):
        zoo.check_stages(backbone, torch.rand(2, 3, 32, 32))


def test_a_head_side_stage_may_run_early_but_a_stage_that_uses_a_later_listed_one_fails():
    """EfficientViM's per-stage norms run after stage 0 but feed only its multi-scale head (timm lists them last):
    freezing a prefix of stages still freezes the input side, so the listing passes. A stage listed before one whose
    output it uses does not (the swapped resnet stages above)."""
    backbone = tlkit.create_backbone("efficientvim_m1")
    x = torch.rand(2, 3, 64, 64)
    assert list(backbone.stage_params())[-1] == "norm" and zoo._forward_order(backbone, x)
    assert zoo.check_stages(backbone, x) == "5 stages"
    modules = dict(backbone.named_modules())
    norm0 = [n for n in modules if n.endswith("norm.0")]
    stage1 = [n for n, m in modules.items() if n.startswith("model.stages.1.") and not any(m.children())]
    stage0 = [n for n, m in modules.items() if n.startswith("model.stages.0.") and not any(m.children())]
    assert norm0 and not zoo._feeds(backbone, x, norm0, stage1)  # the norm feeds the head only
    assert zoo._feeds(backbone, x, stage0, stage1)  # stage 0 feeds stage 1


def test_features_that_are_not_the_pre_logits_fail(monkeypatch):
    forward = FeatureExtractor.forward
    monkeypatch.setattr(
        FeatureExtractor, "forward", lambda self, x: {k: v * 1.001 for k, v in forward(self, x).items()}
    )
    record = zoo.check_model("test_resnet")
    assert statuses(record)["features"] == zoo.FAIL
    assert "differ from pre-logits" in record["checks"]["features"]["reason"]


def test_a_fold_that_changes_the_output_fails_onnx(monkeypatch):
    fuse = tlkit.export.fuse

    def bad_fuse(net, example):
        folded = fuse(net, example)
        with torch.no_grad():
            next(p for p in folded.backbone.parameters() if p.ndim == 4).mul_(2)
        return folded

    monkeypatch.setattr(tlkit.export, "fuse", bad_fuse)
    record = zoo.check_model("test_resnet")
    assert statuses(record)["onnx"] == zoo.FAIL
    assert "onnxruntime differs" in record["checks"]["onnx"]["reason"]


def test_family_is_the_prefix_before_underscore_or_digits():
    assert zoo.family("resnet18") == "resnet"
    assert zoo.family("vit_small_patch16_224") == "vit"
    assert zoo.family("convnext_tiny") == "convnext"
    assert zoo.family("torchvision/resnet18") == "torchvision/resnet"


def test_sweep_records_a_timeout_and_a_result(tmp_path):
    # The first model's clock starts while the worker still imports torch: a 0.5 s limit kills it.
    [timed_out] = list(zoo.sweep(["test_resnet"], workers=1, timeout=0.5, max_rss_mb=1e6))
    assert zoo.outcome(timed_out) == "excluded" and timed_out["excluded"].startswith("timeout")
    [record] = list(zoo.sweep(["test_vit"], workers=1, timeout=120, max_rss_mb=1e6, batch=1))
    assert zoo.outcome(record) == zoo.PASS and record["batch"] == 1, record  # --batch reaches the worker process
    assert "Checked with batch 1 (`--batch 1`: half the memory and time): test_vit." in zoo.render_report([record])


def test_main_resumes_and_reports_from_results(tmp_path, capsys):
    results, report = tmp_path / "r.jsonl", tmp_path / "zoo.md"
    ok = zoo.check_model("test_resnet")
    bad = {**ok, "name": "other_model", "family": "other"}
    bad["checks"] = {**ok["checks"], "stages": {"status": zoo.FAIL, "reason": "CheckFailed: boom"}}
    killed = zoo._killed_record("big_model", "memory", "RSS over 5 MB", 3.0, 6.0)
    results.write_text("".join(json.dumps(r) + "\n" for r in (ok, bad, killed)))
    zoo.main(["--filter", "test_resnet,other_model,big_model", "--results", str(results), "--write-report",
              str(report)])  # fmt: skip
    assert "0 models to check (3 already" in capsys.readouterr().out  # resumed: nothing run again
    zoo.main(["--results", str(results), "--report", str(report)])
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("timm: 1/3 pass every applicable check (33.3%), 1 fail, 1 excluded")
    text = report.read_text()
    assert summary in text
    assert "- `other_model` stages: CheckFailed: boom" in text
    assert "- `big_model`: memory: RSS over 5 MB" in text
    assert "| test | 1 | 1 | 0 | 1/1 |" in text  # family of test_resnet
    recorded = zoo.load_results(results)
    assert zoo.done_names(recorded, []) == {"test_resnet", "other_model", "big_model"}
    assert zoo.done_names(recorded, ["fail"]) == {"test_resnet", "big_model"}  # --redo fail: checked again
    assert (
        zoo.done_names(recorded, ["memory"]) == zoo.done_names(recorded, ["excluded"]) == {"test_resnet", "other_model"}
    )


def test_timeouts_count_cpu_time_not_waiting():
    before = zoo.cpu_seconds(os.getpid())
    time.sleep(0.3)  # waiting (as a worker does while other jobs hold the cores) costs no CPU time
    slept = zoo.cpu_seconds(os.getpid()) - before
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert slept < 0.1 and zoo.cpu_seconds(os.getpid()) - before >= 0.25


class _Fold(torch.nn.Module):  # col2im: torch's ONNX exporter has no opset-17 symbolic for it
    def forward(self, x):
        return torch.nn.functional.fold(x.flatten(2), output_size=(4, 4), kernel_size=1)


class _Chaotic(torch.nn.Module):  # float32 rounding, amplified a billion times, decides the output
    def forward(self, x):
        return torch.sin(1e9 * x).flatten(1)


def test_what_the_exporter_or_arithmetic_cannot_judge_is_told_apart_from_a_failure(tmp_path):
    x = torch.rand(2, 3, 4, 4)
    assert "col2im" in zoo._exporter_refuses_the_model_itself(_Fold(), x, tmp_path)
    assert zoo._exporter_refuses_the_model_itself(torch.nn.Conv2d(3, 3, 1), x, tmp_path) is None
    assert "differ by" in zoo._chaotic(_Chaotic(), x, _Chaotic()(x))
    linear = torch.nn.Conv2d(3, 3, 1)
    assert zoo._chaotic(linear, x, linear(x).detach()) is None
