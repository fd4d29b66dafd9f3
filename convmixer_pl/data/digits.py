"""scikit-learn's bundled handwritten digits: the offline default data set."""

from __future__ import annotations

import torch

from ..preprocessing import DataConfig
from .base import DataError, ImageDataModule, TensorImageDataset, split_indices


class DigitsDataModule(ImageDataModule):
    """The 1,797 8x8 handwritten digits bundled with scikit-learn, upscaled: trains anywhere, no download. Validation
    and test are seeded `val_fraction` and `test_fraction` splits of the images."""

    def __init__(
        self,
        image_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        **loader,
    ) -> None:
        super().__init__(**loader)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError(f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be "
                            "in (0, 1) and leave room for training")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._set_data_config(DataConfig(image_size, in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0,
                                         class_names=[str(i) for i in range(10)]))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # values 0..16
        size = self.data_config.image_size
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        targets = torch.from_numpy(digits.target).long()
        n = len(targets)
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        to_float = self.data_config.batch_transform()
        self.train_set, self.val_set, self.test_set = (
            TensorImageDataset(images[index], targets[index], to_float)
            for index in split_indices(n, [n - n_val - n_test, n_val, n_test], self.seed))
