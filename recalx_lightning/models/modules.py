"""Small architectures the project builds itself: an MLP for tabular data and a compact CNN for digits."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from recalx_lightning._checks import check_positive_int


class MLP(nn.Module):
    """Fully connected classifier: (n, in_features) → logits (n, num_classes).

    Args:
        in_features: number of input features F.
        num_classes: number of classes K (>= 2).
        hidden_sizes: width of each hidden layer (ReLU after each); ``()`` gives logistic regression.
        dropout: dropout after each hidden activation (training only).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(num_classes, "num_classes", minimum=2)
        for h in hidden_sizes:
            check_positive_int(h, "hidden_sizes[i]")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU, 2×2 max-pool after the first two) + global average pool + linear.

    Maps (n, in_chans, H, W) → logits (n, num_classes) for any H, W >= 4.

    Args:
        in_chans: input channels C.
        num_classes: number of classes K.
        width: channels of the first block (doubled in each later block).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        check_positive_int(in_chans, "in_chans")
        check_positive_int(num_classes, "num_classes", minimum=2)
        check_positive_int(width, "width")

        def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.features = nn.Sequential(
            *block(in_chans, width, True), *block(width, 2 * width, True), *block(2 * width, 4 * width, False)
        )
        self.head = nn.Linear(4 * width, num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((-2, -1)))
