"""Datasets for the experiments: MNIST / Fashion-MNIST `.npz` files and embedded digits.

Three ways to get data, none of which needs `../shared`:

* `load_npz(path)`: a local file in the Keras `mnist.npz` layout (`x_train`, `y_train`,
  `x_test`, `y_test`), its sha256 checked against the known checksums (or one you pass).
* `download(url, sha256=...)`: fetches a file once into a cache directory, checks its
  sha256 and reuses the cached copy afterwards.
* `load_digits()`: scikit-learn's 8x8 digits (1797 images), shipped inside scikit-learn.

`load_dataset(name, data_dir=None)` picks the right one: `"digits"` is embedded;
`"mnist"` / `"fashion_mnist"` are read from `data_dir`, else from `$SOO_DATA_DIR`, else
downloaded when `download=True` (MNIST only has a default URL).

Images come back as float32 in [0, 1] with shape `(N, H, W, 1)`, labels as int32.

Example:
  >>> from experiments import data
  >>> ds = data.load_digits()
  >>> ds.x_train.shape, ds.num_classes
  ((1500, 8, 8, 1), 10)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from typing import NamedTuple, Optional, Sequence

import numpy as np

DATA_DIR_ENV = "SOO_DATA_DIR"
CACHE_DIR_ENV = "SOO_CACHE_DIR"

# Known checksums per file name. mnist.npz: the file of ../shared/data (official IDX data
# in the Keras layout) and the Keras distribution of the same data.
KNOWN_SHA256 = {
    "mnist.npz": (
        "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64",
        "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
    "fashion_mnist.npz": (
        "5b6d2c4c694a91887af8ab7d039c04f80af3c29378d731c93a538d2e831aa469",
    ),
}
FILE_NAMES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz"}
DEFAULT_URLS = {
    "mnist": ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
              KNOWN_SHA256["mnist.npz"][1]),
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "random")


class ChecksumError(ValueError):
  """A data file's sha256 is not the expected one."""


class Dataset(NamedTuple):
  """Images in [0, 1] with shape `(N, H, W, 1)` and integer labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str
  num_classes: int = 10

  @property
  def image_shape(self):
    return self.x_train.shape[1:]


def sha256_of(path: str) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str, expected: Sequence[str] | str) -> str:
  """Returns the file's sha256; raises `ChecksumError` when it is not one of `expected`."""
  expected = (expected,) if isinstance(expected, str) else tuple(expected)
  actual = sha256_of(path)
  if actual not in {e.lower() for e in expected}:
    raise ChecksumError(
        f"checksum mismatch for {path}: sha256 is {actual}, expected "
        f"{' or '.join(expected)}. The file is corrupt, truncated or not the dataset it is "
        "named after; delete it and fetch it again.")
  return actual


def _expected_sha256(path: str, sha256) -> Sequence[str]:
  if sha256 is not None:
    return (sha256,) if isinstance(sha256, str) else tuple(sha256)
  known = KNOWN_SHA256.get(os.path.basename(path))
  if known is None:
    raise ValueError(
        f"no known checksum for {os.path.basename(path)!r}: pass sha256=... (known files: "
        f"{', '.join(sorted(KNOWN_SHA256))}).")
  return known


def load_npz(path: str, *, sha256: Sequence[str] | str | None = None,
             name: Optional[str] = None) -> Dataset:
  """Loads a Keras-layout `.npz` (uint8 images 0..255) after checking its sha256.

  Args:
    path: the `.npz` file.
    sha256: expected checksum(s); by default the known ones for the file's name.
    name: dataset name for reports (default: the file name without extension).

  Returns:
    A `Dataset` with float32 images in [0, 1], shape `(N, H, W, 1)`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset file {path} does not exist")
  verify_sha256(path, _expected_sha256(path, sha256))
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"{path} lacks the Keras-layout arrays {missing}; found {f.files}")
    arrays = {k: f[k] for k in NPZ_KEYS}
  return Dataset(
      x_train=_images(arrays["x_train"], 255.0), y_train=arrays["y_train"].astype(np.int32),
      x_test=_images(arrays["x_test"], 255.0), y_test=arrays["y_test"].astype(np.int32),
      name=name or os.path.splitext(os.path.basename(path))[0],
      num_classes=int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1)


def _images(x: np.ndarray, scale: float) -> np.ndarray:
  x = np.asarray(x, np.float32) / scale
  return x[..., None] if x.ndim == 3 else x


def default_cache_dir() -> str:
  return os.environ.get(CACHE_DIR_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "secondorder_optax")


def download(url: str, *, sha256: Sequence[str] | str, cache_dir: Optional[str] = None,
             filename: Optional[str] = None, timeout: float = 60.0) -> str:
  """Downloads `url` into `cache_dir` once, verifying its sha256; returns the local path.

  A cached file with the right checksum is reused without network access. A download whose
  checksum does not match raises `ChecksumError` and leaves nothing in the cache.
  """
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  target = os.path.join(cache_dir, filename or os.path.basename(url.split("?")[0]))
  if os.path.isfile(target):
    try:
      verify_sha256(target, sha256)
      return target
    except ChecksumError:
      os.remove(target)  # A stale or corrupt cache entry: fetch it again.
  fd, partial = tempfile.mkstemp(dir=cache_dir, suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      shutil.copyfileobj(response, out)
    verify_sha256(partial, sha256)
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return target


def load_digits(*, num_train: int = 1500) -> Dataset:
  """scikit-learn's 8x8 digits (embedded, no download), split in a fixed order.

  The first `num_train` images of a fixed permutation (seed 0) are the training set, the
  rest the test set. Pixel values 0..16 are scaled to [0, 1].
  """
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  digits = sk_load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  x = _images(digits.images[order], 16.0)
  y = digits.target[order].astype(np.int32)
  return Dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:], "digits")


def random_images(*, num_train: int = 2000, num_test: int = 500, shape=(28, 28, 1),
                  num_classes: int = 10, seed: int = 0) -> Dataset:
  """Uniform random images and labels (for timing only: nothing to learn)."""
  rng = np.random.default_rng(seed)
  x = rng.random((num_train + num_test, *shape), dtype=np.float32)
  y = rng.integers(0, num_classes, num_train + num_test).astype(np.int32)
  return Dataset(x[:num_train], y[:num_train], x[num_train:], y[num_train:], "random",
                 num_classes)


def load_dataset(name: str = "digits", *, data_dir: Optional[str] = None,
                 allow_download: bool = False, url: Optional[str] = None,
                 sha256: Optional[str] = None) -> Dataset:
  """Loads a dataset by name: 'digits' (embedded), 'mnist', 'fashion_mnist' or 'random'.

  MNIST / Fashion-MNIST are read from `<data_dir>/<name>.npz`, `data_dir` defaulting to
  `$SOO_DATA_DIR`; if there is no such file and `allow_download` is set, the file is
  downloaded from `url` (MNIST has a default) and cached.
  """
  if name == "digits":
    return load_digits()
  if name == "random":
    return random_images()
  if name not in FILE_NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  if data_dir:
    path = os.path.join(data_dir, FILE_NAMES[name])
    if os.path.isfile(path):
      return load_npz(path, sha256=sha256, name=name)
  if allow_download:
    default_url, default_sha = DEFAULT_URLS.get(name, (None, None))
    if (url or default_url) is None:
      raise ValueError(f"no default download URL for {name!r}: pass url=... and sha256=...")
    path = download(url or default_url, sha256=sha256 or default_sha,
                    filename=FILE_NAMES[name])
    return load_npz(path, sha256=sha256 or default_sha, name=name)
  where = f"{data_dir}/{FILE_NAMES[name]}" if data_dir else f"${DATA_DIR_ENV}"
  raise FileNotFoundError(
      f"dataset {name!r} not found (looked for {where}). Pass a data directory holding "
      f"{FILE_NAMES[name]} (--data-dir or ${DATA_DIR_ENV}), allow a download, or use the "
      "embedded 'digits'.")
