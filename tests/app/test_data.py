"""Datasets held on the device: where the files are looked for, batches, shifts, subsets."""

import pytest
import torch

from svdgrow.app import data as data_mod
from svdgrow.app.cli import main
from svdgrow.app.data import DeviceDataset, load_dataset, random_shift


def test_missing_data_error_names_every_place(tmp_path, capsys):
    empty = tmp_path / "nowhere"
    code = main(["train", "--preset", "quick", "--data-dir", str(empty), "--no-download",
                 "--run-dir", str(tmp_path / "run"), "--no-progress", "--epochs", "1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty.resolve() / "MNIST" / "raw") in err
    assert "--data-dir" in err and "SVDGROW_DATA" in err and "--no-download" in err


def test_missing_data_default_search_lists_all_roots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SVDGROW_DATA", str(tmp_path / "envdir"))
    monkeypatch.setattr(data_mod, "find_root", lambda *a, **k: None)
    with pytest.raises(data_mod.DataNotFoundError) as info:
        data_mod.load_dataset("fashion-mnist", train=False, download=False)
    msg = str(info.value)
    assert str(tmp_path / "envdir" / "FashionMNIST" / "raw") in msg
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert "shared" in msg


def test_explicit_data_dir_is_the_only_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDGROW_DATA", str(tmp_path / "envdir"))
    assert data_mod.candidate_roots(tmp_path / "mine") == [tmp_path / "mine"]
    assert tmp_path / "envdir" == data_mod.candidate_roots()[0]


def test_unknown_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar", train=True)


def test_random_shift_is_a_shift_with_plain_strides():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(1, 255, (64, 1, 12, 12), dtype=torch.uint8)
    out = random_shift(imgs, 2, g)
    # plain NCHW strides (channels-last strides once crashed oneDNN's conv backward)
    assert out.shape == imgs.shape and out.stride() == (144, 144, 12, 1)
    pad = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    for i in range(64):  # each output is some 12x12 window of the zero-padded image
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(pad[i, :, dy : dy + 12, dx : dx + 12], out[i])
        ]
        assert hits, i
    assert len({tuple(out[i].flatten()[:20].tolist()) for i in range(64)}) > 1


def _toy(n=10):
    images = torch.arange(n * 16, dtype=torch.uint8).reshape(n, 1, 4, 4)
    return DeviceDataset(images, torch.arange(n) % 3, mean=0.5, std=0.25, name="toy")


def test_batch_normalises_and_gathers():
    ds = _toy()
    x, y = ds.batch(torch.tensor([3, 1]))
    assert x.dtype == torch.float32 and x.shape == (2, 1, 4, 4)
    torch.testing.assert_close(x[0], (ds.images[3].float() / 255 - 0.5) / 0.25)
    assert y.tolist() == [0, 1]


def test_batches_cover_the_split_once():
    ds = _toy(10)
    assert ds.num_batches(4) == 3 and ds.num_batches(4, drop_last=True) == 2
    labels = torch.cat([y for _, y in ds.batches(4, generator=torch.Generator().manual_seed(0))])
    assert sorted(labels.tolist()) == sorted(ds.labels.tolist())
    assert sum(1 for _ in ds.batches(4, drop_last=True)) == 2


def test_subset_is_fixed_by_its_seed(data_dir):
    a = load_dataset("mnist", train=True, data_dir=data_dir, download=False, subset=50)
    b = load_dataset("mnist", train=True, data_dir=data_dir, download=False, subset=50)
    c = load_dataset(
        "mnist", train=True, data_dir=data_dir, download=False, subset=50, subset_seed=1
    )
    assert len(a) == 50 and a.images.dtype == torch.uint8 and a.images.shape[1:] == (1, 28, 28)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
