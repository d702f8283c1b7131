"""MNIST and Fashion-MNIST held whole on the device, batched and normalised there.

A dataset split is kept as ONE ``uint8`` tensor ``images (Tensor[N, 1, 28, 28])`` plus
``labels (Tensor[N])`` on the training device. Batches are drawn by random permutation
indices, converted to float and normalised on the device, and optionally shifted by up to
``shift`` pixels (zero padding plus a per-sample random crop, fully vectorised): no DataLoader,
no worker processes, no host-device copies per step.

Where the files come from: an explicit ``data_dir`` (the ``--data-dir`` flag) if given;
otherwise the first of ``$SVDGROW_DATA``, ``./data``, ``../shared/data`` (relative to the
working directory and to the repository) that holds the dataset in torchvision's layout
(``MNIST/raw/...``, ``FashionMNIST/raw/...``). When none has it and downloading is allowed, it
is downloaded by torchvision into the explicit folder, or ``$SVDGROW_DATA``, or ``./data``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.datasets as tvd

__all__ = [
    "DATASETS",
    "DataCorruptError",
    "DataNotFoundError",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "DeviceDataset",
    "candidate_roots",
    "draw_offsets",
    "find_root",
    "load_dataset",
    "random_shift",
]

logger = logging.getLogger(__name__)

ENV_VAR = "SVDGROW_DATA"

# name -> (torchvision class name, folder, mean, std)
DATASETS: dict[str, tuple[str, str, float, float]] = {
    "mnist": ("MNIST", "MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST", 0.2860, 0.3530),
}
"""Known datasets: ``name -> (torchvision class, folder under the root, mean, std)``."""

IMAGE_SHAPE = (1, 28, 28)
"""``(channels, height, width)`` of every sample of every known dataset."""
NUM_CLASSES = 10
"""Classes of every known dataset."""

_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(FileNotFoundError):
    """The dataset is in none of the places searched and could not be downloaded."""


class DataCorruptError(ValueError):
    """The dataset's files are there but cannot be parsed (truncated or corrupt)."""


def _canonical(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key in ("fashion", "fashionmnist"):
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The dataset roots searched, in order.

    Args:
        data_dir: an explicit root (``--data-dir``); when given it is the only place searched.
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path("data"))
    roots.append(Path("..") / "shared" / "data")
    repo = Path(__file__).resolve().parents[2]
    roots.append(repo / "data")
    roots.append(repo.parent / "shared" / "data")
    unique: list[Path] = []
    seen = set()
    for r in roots:
        key = os.path.abspath(r)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def _has_files(root: Path, folder: str) -> bool:
    raw = root / folder / "raw"
    return all((raw / f).exists() or (raw / (f + ".gz")).exists() for f in _RAW_FILES)


def find_root(dataset: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first candidate root that holds ``dataset`` in torchvision's layout, else None."""
    folder = DATASETS[_canonical(dataset)][1]
    for root in candidate_roots(data_dir):
        if _has_files(root, folder):
            return root
    return None


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path("data")


_CACHE: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_split(cls, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one split (cached per process: repeated runs in one process parse it once)."""
    key = (cls.__name__, os.path.abspath(root), train)
    if key not in _CACHE:
        _CACHE[key] = _parse_split(cls, root, train=train, download=download)
    images, labels = _CACHE[key]
    return images.clone(), labels.clone()


def _parse_split(cls, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        ds = cls(str(root), train=train, download=download)
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and download:
            raise  # a failed download: reported with the places searched
        raw = Path(root).resolve() / cls.__name__ / "raw"
        split = "train" if train else "test"
        raise DataCorruptError(
            f"cannot parse the {cls.__name__} {split} split in {raw}: {exc}. A file there is "
            "truncated or corrupt: delete it (and download again) or point --data-dir elsewhere"
        ) from exc
    images = ds.data
    if not isinstance(images, torch.Tensor):  # pragma: no cover - older torchvision
        images = torch.as_tensor(images)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return images.to(torch.uint8).unsqueeze(1).contiguous(), labels


@dataclass
class DeviceDataset:
    """One split held on a device as a single uint8 tensor.

    Attributes:
        images: ``Tensor[N, 1, H, W]``, uint8, on ``device``.
        labels: ``Tensor[N]``, int64, on ``device``.
        mean: normalisation mean (of pixel values scaled to [0, 1]).
        std: normalisation standard deviation (of pixel values scaled to [0, 1]).
        name: dataset name.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def normalise(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``Tensor[B, 1, H, W]`` -> normalised float ``Tensor[B, 1, H, W]``."""
        x = images.to(dtype, memory_format=torch.contiguous_format).div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def batch(
        self,
        index: torch.Tensor,
        augment: bool = False,
        shift: int = 2,
        generator: torch.Generator | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, (optionally) shift and normalise the samples at ``index``, or one part of them.

        Args:
            index: ``Tensor[B]`` of sample indices on the dataset's device.
            augment: shift every sample by its own random offset in ``[-shift, shift]`` pixels
                (zero padding, so a shifted digit loses nothing but background).
            shift: the largest shift in pixels.
            generator: the random generator for the offsets (on the dataset's device).
            part: ``(k, n)``: return only the k-th of ``n`` equal contiguous parts of ``index``
                (one process's share of a global batch). The offsets are drawn for the whole of
                ``index``, so every process's generator stays in step with the others', and
                ``(0, 1)`` draws exactly what a one-process batch draws.

        Returns:
            ``(x (Tensor[B/n, 1, H, W] float32), y (Tensor[B/n] int64))``.
        """
        k, n = part
        size = index.shape[0] // n
        offsets = None
        if augment and shift > 0:
            offsets = draw_offsets(index.shape[0], shift, index.device, generator)
            offsets = offsets[:, k * size : (k + 1) * size]
        index = index[k * size : (k + 1) * size] if n > 1 else index
        imgs = self.images.index_select(0, index)
        if offsets is not None:
            imgs = random_shift(imgs, shift, offsets=offsets)
        return self.normalise(imgs), self.labels.index_select(0, index)

    def shard(self, k: int, n: int) -> DeviceDataset:
        """The k-th of ``n`` contiguous parts of this split (one process's share of an
        evaluation); ``(0, 1)`` is the whole split."""
        lo, hi = len(self) * k // n, len(self) * (k + 1) // n
        return DeviceDataset(self.images[lo:hi], self.labels[lo:hi], self.mean, self.std, self.name)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        augment: bool = False,
        shift: int = 2,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over one epoch of batches (a random permutation when ``shuffle``)."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(
                order[start : start + batch_size], augment=augment, shift=shift, generator=generator
            )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per epoch."""
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


def draw_offsets(
    count: int, shift: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``Tensor[2, count]``: a random (row, column) offset in ``[0, 2 * shift]`` per image."""
    return torch.randint(0, 2 * shift + 1, (2, count), device=device, generator=generator)


def random_shift(
    images: torch.Tensor,
    shift: int,
    generator: torch.Generator | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shift every image by its own random offset of up to ``shift`` pixels, vectorised.

    Args:
        images: ``Tensor[B, C, H, W]`` (any dtype).
        shift: largest shift in pixels, per axis.
        generator: random generator on ``images.device``.
        offsets: the offsets to use instead of drawing them (:func:`draw_offsets`).

    Returns:
        ``Tensor[B, C, H, W]``: each image zero-padded by ``shift`` and cropped back to H x W at
        a random offset.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    dev = images.device
    if offsets is None:
        offsets = draw_offsets(b, shift, dev, generator)
    rows = offsets[0][:, None] + torch.arange(h, device=dev)[None, :]  # [B, H]
    cols = offsets[1][:, None] + torch.arange(w, device=dev)[None, :]  # [B, W]
    bidx = torch.arange(b, device=dev)[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] for every b, i, j
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    # clone into plain NCHW strides: for C == 1 a permuted view already counts as contiguous
    # but keeps channels-last strides, which steer oneDNN's convolution backward onto a path
    # that corrupted memory once widths became odd (torch 2.14, 1 thread)
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def load_dataset(
    name: str,
    train: bool,
    device: str | torch.device = "cpu",
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    subset: int | None = None,
    subset_seed: int = 0,
) -> DeviceDataset:
    """Load one split of MNIST or Fashion-MNIST onto ``device`` as a :class:`DeviceDataset`.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        train: the training split (60k) or the test split (10k).
        device: where the tensors live.
        data_dir: an explicit dataset root (only place searched, and the download target).
        download: let torchvision download the files when they are found nowhere.
        subset: keep only this many samples (a fixed random subset, drawn with ``subset_seed``).
        subset_seed: seed of the subset draw.

    Raises:
        DataNotFoundError: when the files are in none of the searched places and downloading is
            off or failed; the message lists every place searched and how to point elsewhere.
    """
    key = _canonical(name)
    cls_name, folder, mean, std = DATASETS[key]
    cls = getattr(tvd, cls_name)
    root = find_root(key, data_dir)
    split = "train" if train else "test"
    if root is None:
        searched = [str(Path(r).resolve() / folder / "raw") for r in candidate_roots(data_dir)]
        why = "downloading is off (--no-download)"
        if download:
            target = _download_root(data_dir)
            logger.info("%s not found locally; downloading into %s", key, target)
            try:
                target.mkdir(parents=True, exist_ok=True)
                images, labels = _load_split(cls, target, train=train, download=True)
                root = target
            except Exception as exc:  # noqa: BLE001 - reported below with the searched places
                why = f"the download into {target.resolve()} failed: {type(exc).__name__}: {exc}"
        if root is None:
            raise DataNotFoundError(
                f"{key} ({split} split) not found. Looked for the torchvision layout "
                f"<root>/{folder}/raw/{{{','.join(_RAW_FILES)}}} in: "
                + "; ".join(searched)
                + f"; and {why}. Point svdgrow at a folder holding {folder}/raw with --data-dir DIR "
                f"or the environment variable {ENV_VAR}=DIR, or allow the download (online)."
            )
    else:
        images, labels = _load_split(cls, root, train=train, download=False)
    if subset is not None and subset < images.shape[0]:
        g = torch.Generator().manual_seed(subset_seed + (0 if train else 1))
        keep = torch.randperm(images.shape[0], generator=g)[:subset]
        images, labels = images[keep].contiguous(), labels[keep].contiguous()
    logger.info("loaded %s %s: %d samples from %s", key, split, images.shape[0], root)
    return DeviceDataset(images.to(device), labels.to(device), mean, std, key)
