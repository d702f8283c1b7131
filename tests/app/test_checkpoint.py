"""Checkpoints: exact round trip, atomic writes, weights_only loading, clear errors."""

import os

import pytest
import torch

from svdgrow.app import checkpoint as ck
from svdgrow.app.models import build_model, preset_spec, spec_of


def _trained(seed=0):
    torch.manual_seed(seed)
    model = build_model(preset_spec("quick"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    for _ in range(2):
        loss = model(torch.randn(4, 1, 28, 28)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def test_round_trip_exact(tmp_path):
    model, opt, sched = _trained()
    # shrink one width in place, as the resizer would
    conv = model.blocks[0].conv1
    conv.weight = torch.nn.Parameter(conv.weight[:5].clone())
    bn = model.blocks[0].bn1
    bn.weight = torch.nn.Parameter(bn.weight[:5].clone())
    bn.bias = torch.nn.Parameter(bn.bias[:5].clone())
    bn.running_mean = bn.running_mean[:5].clone()
    bn.running_var = bn.running_var[:5].clone()
    nxt = model.blocks[0].conv2
    nxt.weight = torch.nn.Parameter(nxt.weight[:, :5].clone())
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt2.step()
    gen = torch.Generator().manual_seed(5)
    path = tmp_path / "run" / "last.pt"
    ck.save_checkpoint(
        path,
        model,
        opt2,
        sched,
        step=7,
        epoch=2,
        rng=ck.rng_state({"data": gen}),
        extra={"note": "x"},
    )
    model2, loaded = ck.load_model(path)
    assert loaded["spec"] == spec_of(model)
    assert loaded["spec"]["blocks"][0]["mid"] == 5
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert k == k2
        assert torch.equal(a, b), k
    assert loaded["step"] == 7 and loaded["epoch"] == 2 and loaded["extra"] == {"note": "x"}
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model2(x))
    # optimizer state re-attaches by name
    names = loaded["optimizer_param_names"]
    params = dict(model2.named_parameters())
    opt3 = torch.optim.SGD([params[n] for n in names[0]], lr=0.1, momentum=0.9)
    opt3.load_state_dict(loaded["optimizer"])
    for p_old, p_new in zip(
        opt2.param_groups[0]["params"], opt3.param_groups[0]["params"], strict=True
    ):
        assert torch.equal(
            opt2.state[p_old]["momentum_buffer"], opt3.state[p_new]["momentum_buffer"]
        )
    # RNG states as tensors
    gen2 = torch.Generator()
    ck.set_rng_state(loaded["rng"], {"data": gen2})
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=gen2))


def test_loaded_with_weights_only(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, model, opt, sched)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ck.load_checkpoint(path)
    assert calls == [True]
    # and the raw file itself loads under the restricted unpickler
    real(path, weights_only=True)


def test_atomic_write_survives_injected_failure(tmp_path, monkeypatch):
    model, opt, sched = _trained(0)
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, model, opt, sched, step=1)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage" * 100)  # something lands on disk first
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", failing_save)
    other, opt2, _ = _trained(1)
    with pytest.raises(OSError, match="injected"):
        ck.save_checkpoint(path, other, opt2, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "temp file left behind"


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ck.CheckpointError, match="nope.pt"):
        ck.load_checkpoint(missing)
    model, opt, sched = _trained()
    path = tmp_path / "trunc.pt"
    ck.save_checkpoint(path, model, opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="trunc.pt"):
        ck.load_checkpoint(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ck.CheckpointError, match="junk.pt"):
        ck.load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(ck.CheckpointError, match="not an svdgrow checkpoint"):
        ck.load_checkpoint(other)
