"""Checkpoints: exact round trip, atomic writes, weights_only loading, clear errors."""

import os

import pytest
import torch

from faults import flip_a_tensor_byte, write_unsafe_checkpoint
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


def test_a_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    model, opt, sched = _trained()
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, model, opt, step=3)
    raw = torch.load(path, weights_only=True)
    assert raw["sha256"] == ck.checksum(raw) and ck.load_checkpoint(path)["step"] == 3
    flip_a_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(ck.CheckpointError, match=r"c\.pt is corrupt: .*sha256"):
        ck.load_checkpoint(path)


def test_checksum_covers_every_value():
    model, opt, _ = _trained()
    base = {"model": model.state_dict(), "step": 3, "rng": {"torch": torch.get_rng_state()}}
    digest = ck.checksum(base)
    assert ck.checksum({**base, "sha256": "anything"}) == digest
    assert ck.checksum({**base, "step": 4}) != digest
    changed = {k: v.clone() for k, v in base["model"].items()}
    changed["stem.weight"].view(-1)[0] += 1e-6
    assert ck.checksum({**base, "model": changed}) != digest
    assert ck.checksum(dict(reversed(list(base.items())))) == digest  # key order is irrelevant


def test_old_checkpoints_without_a_checksum_still_load(tmp_path):
    model, opt, _ = _trained()
    path = tmp_path / "old.pt"
    ck.save_checkpoint(path, model, opt, step=5)
    raw = torch.load(path, weights_only=True)
    del raw["sha256"]
    torch.save(raw, path)
    assert ck.load_checkpoint(path)["step"] == 5


def test_a_checkpoint_missing_a_key_names_it(tmp_path):
    model, opt, _ = _trained()
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, model, opt)
    raw = torch.load(path, weights_only=True)
    del raw["rng"]
    torch.save(raw, path)
    with pytest.raises(ck.CheckpointError, match="lacks 'rng'"):
        ck.load_checkpoint(path)


def test_an_unsafe_pickle_is_refused_with_the_reason_on_one_line(tmp_path, capfd):
    path = tmp_path / "evil.pt"
    write_unsafe_checkpoint(path)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_checkpoint(path)
    msg = str(info.value)
    assert "refusing to load" in msg and "system" in msg and "weights_only" in msg
    assert "\n" not in msg and "\x1b" not in msg
    assert "must never run" not in capfd.readouterr().out


def test_remove_stale_temps(tmp_path):
    (tmp_path / ".last.pt.k2j3h.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"x")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    assert [p.name for p in ck.remove_stale_temps(tmp_path)] == [".last.pt.k2j3h.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    assert ck.remove_stale_temps(tmp_path / "absent") == []
