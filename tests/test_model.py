"""model.py: the one-logit model, the precision rule, the input pipeline and the checkpoint schema."""
import pytest
import torch

import common
from helico import model


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_build_model_has_one_logit_head(arch):
    net = common.build_model(arch, "none")
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 1)


def test_build_model_loads_a_weights_file_and_rejects_bad_names(tmp_path):
    src = common.build_model("resnet18", "none")
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    loaded = common.build_model("resnet18", str(tmp_path / "w.pt"))
    assert torch.equal(loaded.conv1.weight, src.conv1.weight)
    with pytest.raises(common.DataError, match="--arch resnet19"):
        common.build_model("resnet19", "none")
    with pytest.raises(common.DataError, match="--weights .*missing.pt: file not found"):
        common.build_model("resnet18", str(tmp_path / "missing.pt"))


def test_load_checkpoint_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(common.DataError, match="missing.pt: file not found"):
        common.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.DataError, match=r"junk.pt: unreadable checkpoint \(UnpicklingError") as e:
        common.load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(e.value)
    torch.save({"version": torch.__version__}, tmp_path / "foreign.pt")  # a TorchVersion object, not plain data
    with pytest.raises(common.DataError, match="Unsupported global"):
        common.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(common.DataError, match="not a train.py checkpoint .missing arch, config, split, stain, threshold, image_size"):
        common.load_checkpoint(tmp_path / "partial.pt")


@pytest.mark.parametrize("capability, dtype, scaled", [((7, 0), torch.float16, True), ((7, 5), torch.float16, True),
                                                       ((8, 0), torch.bfloat16, False),
                                                       ((9, 0), torch.bfloat16, False)])
def test_bf16_only_from_compute_capability_8_of_the_chosen_gpu_else_fp16_scaled(monkeypatch, capability, dtype, scaled):
    # is_bf16_supported() says True on V100/T4 (emulated, slow) and asks the current device, not the chosen one
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    run = model.precision(torch.device("cuda", 1))
    assert (run.amp, run.dtype, run.grad_scaling) == (True, dtype, scaled)
    assert asked == [torch.device("cuda", 1)]


def test_cpu_precision_is_bf16_without_asking_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: pytest.fail("asked CUDA on the CPU"))
    run = model.precision(torch.device("cpu"), amp=True)
    assert (run.amp, run.dtype, run.grad_scaling) == (True, torch.bfloat16, False)


@pytest.fixture
def kernel_settings():
    """Restore the process-wide settings math_settings changes."""
    import os
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[2:4]
    torch.use_deterministic_algorithms(saved[4])
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if saved[5] is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


def test_kernel_settings_are_fast_by_default_and_repeatable_with_deterministic(kernel_settings, monkeypatch):
    import os
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    gpu = torch.device("cuda", 0)  # the flags are plain process settings: a CPU build sets them too
    model.math_settings(gpu)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    model.math_settings(gpu, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    torch.backends.cudnn.benchmark = False
    model.math_settings(torch.device("cpu"))  # the CPU's settings are left alone
    assert not torch.backends.cudnn.benchmark
