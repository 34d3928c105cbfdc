"""A third-party dcanets plugin in one file: after ``pip install`` and ``import dcanets``,
``timm.create_model("tinymlp")`` builds this model; dcanets itself is not changed."""
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs

from dcanets import hookimpl


class TinyMLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, hidden: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


default_cfgs = generate_default_cfgs({
    "tinymlp": dict(url="", num_classes=10, input_size=(1, 8, 8), classifier="fc"),
})


def tinymlp(pretrained: bool = False, **kwargs) -> TinyMLP:
    """A 1-hidden-layer MLP for 8x8 single-channel images (e.g. sklearn's digits)."""
    return build_model_with_cfg(TinyMLP, "tinymlp", pretrained, **kwargs)


@hookimpl
def dcanets_register_models():
    return [tinymlp]
