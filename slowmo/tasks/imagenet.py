"""ImageNet through torchvision's ``ImageFolder`` (``data.root``/train and /val, one folder per class), ResNet-50,
standard augmentation (random resized crop, flip; resize + center crop for validation), top-1 and top-5."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models import ModelConfig, build_model
from ..registry import ConfigError, setting
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(path: Path, transform):
    from torchvision.datasets import ImageFolder  # here: torchvision takes seconds to import, a config check none

    if not path.is_dir():
        raise ConfigError(
            f"ImageNet split missing: {path} is not a directory; data.root must hold train/ and val/ "
            "with one sub-directory of images per class"
        )
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise ConfigError(
            f"no images under {path} ({str(error).splitlines()[0]}); data.root must hold train/ and "
            "val/ with one sub-directory of images per class"
        ) from None


@dataclass
class ImageNetData(ImageData):
    root: str | None = setting(run_control=True)  # the directory holding train/ and val/ in ImageFolder layout
    augment: bool  # random resized crop and flip (else resize and center crop)
    image_size: int = setting(minimum=1)  # crop size


@TASKS.register(
    "imagenet",
    TaskConfig,
    data=ImageNetData,
    label="ImageNet",
    inputs="images",
    needs="an image model",
    imports=("torchvision",),
)
def build(task: TaskConfig, data: ImageNetData, model: ModelConfig, ctx: TaskContext) -> Task:
    if data.root is None:
        raise ConfigError("task imagenet needs data.root: the directory holding train/ and val/ in ImageFolder layout")
    import torchvision.transforms as T

    root, size = Path(data.root), data.image_size
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    augment = (
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if data.augment else [T.Resize(size), T.CenterCrop(size)]
    )
    train = _folder(root / "train", T.Compose(augment + normalize))
    val = _folder(root / "val", T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] + normalize))
    if train.classes != val.classes:
        raise ConfigError(f"train/ has {len(train.classes)} classes and val/ has {len(val.classes)}; they must match")
    net = build_model(model, num_classes=len(train.classes), input_shape=(3, size, size))
    return classification(net, train, val, data, ctx, task.label_smoothing, topk=5)
