"""CalciumNet: a small 2-D U-Net that decides which coronary artery, if any,
each calcified pixel belongs to.

Lesions themselves come from the full-resolution HU threshold (so scores stay
exact); the network only classifies candidate calcium, on a coarse in-plane grid
(``preprocessing.TARGET_SPACING_MM``), which keeps CPU inference cheap.

Output classes: 0 = calcium that is not coronary (bone, aorta, valves, noise),
1 LM, 2 LAD, 3 LCX, 4 RCA.

In training only, a network can carry a second output, the artery map: which
artery, if any, each pixel lies on, calcified or not (``artery_head``). It teaches
the shared layers where the arteries run; it is removed before export
(``without_artery_heads``), so the graph that runs in the workflow has one output.

``CalciumEnsemble`` averages the class probabilities of several CalciumNets (the
shipped model: two, trained alike on different amounts of data for different lengths).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from cacflow.model.preprocessing import size_multiple

N_CLASSES = 5


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CalciumNet(nn.Module):
    """U-Net with ``len(widths) - 1`` poolings; input H and W must be multiples
    of ``size_multiple(widths)`` (the preprocessing pads to SIZE_MULTIPLE)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 24, 32, 48, 64), artery_head: bool = False):
        super().__init__()
        self.widths = tuple(widths)
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for width in widths:
            self.encoders.append(_conv_block(c_prev, width))
            c_prev = width
        self.decoders = nn.ModuleList()
        for width_skip, width_below in zip(widths[-2::-1], widths[:0:-1]):
            self.decoders.append(_conv_block(width_skip + width_below, width_skip))
        self.head = nn.Conv2d(widths[0], N_CLASSES, 1)
        # Background and the four arteries, read from the same features as ``head``.
        self.artery_head = nn.Conv2d(widths[0], N_CLASSES, 1) if artery_head else None

    @property
    def size_multiple(self) -> int:
        return size_multiple(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))

    def forward_with_arteries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calcium logits, artery-map logits) of a network built with ``artery_head``."""
        features = self._features(x)
        return self.head(features), self.artery_head(features)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = decoder(torch.cat([skip, x], dim=1))
        return x


class CalciumEnsemble(nn.Module):
    """CalciumNets trained alike but not identically make different mistakes; the mean
    of their class probabilities keeps what they agree on (on the validation phantoms
    the shipped pair beat each member: docs/evaluation.md).

    Returns log-probabilities, which every consumer can treat as logits:
    softmax(log p) = p, and cross-entropy on them is the ensemble's log-loss, so the
    same training loop fine-tunes an ensemble."""

    # Keeps log() finite; far below any decision. fp16 engines (TensorRT) hold it as a
    # subnormal; one that flushes it to 0 gives -inf, which softmax maps back to 0.
    MIN_PROBABILITY = 1e-6

    def __init__(self, in_channels: int, widths: tuple[int, ...], n_members: int, artery_head: bool = False):
        super().__init__()
        if n_members < 2:
            raise ValueError(f"an ensemble needs at least two members, got {n_members}")
        self.members = nn.ModuleList(CalciumNet(in_channels, widths, artery_head) for _ in range(n_members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean_log_probabilities([member(x) for member in self.members])

    def forward_with_arteries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs of every member, each averaged as ``forward`` averages one."""
        calcium, arteries = zip(*(member.forward_with_arteries(x) for member in self.members))
        return self._mean_log_probabilities(calcium), self._mean_log_probabilities(arteries)

    def _mean_log_probabilities(self, logits: list[torch.Tensor]) -> torch.Tensor:
        probabilities = torch.stack([_channel_softmax(each) for each in logits]).mean(dim=0)
        return torch.log(probabilities.clamp_min(self.MIN_PROBABILITY))


def _channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis, written out: exported to ONNX it is a few
    broadcast operations, where ONNX Runtime's Softmax on axis 1 of NCHW data moves
    the tensor around first (measured: 0.99 -> 0.80 s of engine time for a gated
    scan's 49 slices on 2 cores, outputs within 1e-6)."""
    exp = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return exp / exp.sum(dim=1, keepdim=True)


def build_network(in_channels: int, widths: tuple[int, ...], n_members: int = 1, artery_head: bool = False) -> nn.Module:
    """One CalciumNet, or an ensemble of ``n_members`` of them (``artery_head``: each
    with the artery-map output, for training)."""
    if n_members == 1:
        return CalciumNet(in_channels, widths, artery_head)
    return CalciumEnsemble(in_channels, widths, n_members, artery_head)


def without_artery_heads(network: nn.Module) -> nn.Module:
    """``network`` with its artery-map outputs removed (in place): what is exported and
    shipped takes the calcium output only, and its weights load into a plain network."""
    for module in network.modules():
        if isinstance(module, CalciumNet):
            module.artery_head = None
    return network


def with_fresh_artery_heads(state_dict: dict, target: dict) -> dict:
    """``state_dict`` (weights without artery heads) completed with ``target``'s freshly
    initialised artery heads: a network that learns the artery map starts from a
    trained one's calcium output exactly."""
    fresh = {name: value for name, value in target.items() if ".artery_head." in f".{name}" and name not in state_dict}
    return {**state_dict, **fresh}


def ensemble_size(state_dict: dict) -> int:
    """Members in saved weights: 1 for a plain CalciumNet's."""
    members = {name.split(".")[1] for name in state_dict if name.startswith("members.")}
    return len(members) or 1


def _first_layer_keys(state_dict: dict) -> list[str]:
    """The first convolution's weights of each network in ``state_dict``."""
    return [name for name in state_dict if name.endswith("encoders.0.0.weight")]


def first_layer_channels(state_dict: dict) -> int:
    """Input channels the weights ``state_dict`` take."""
    return int(state_dict[_first_layer_keys(state_dict)[0]].shape[1])


def widened_first_layers(state_dict: dict, target: dict) -> dict:
    """``state_dict`` fitted to a network (``target``, its state dict) that takes more
    input channels: the first convolutions get zero weights for the extra channels, so
    the widened network computes exactly what the given one does until it is trained
    (a fine-tune onto a larger input set starts from the model it tunes)."""
    widened = dict(state_dict)
    for name in _first_layer_keys(state_dict):
        have, want = state_dict[name], target[name]
        if have.shape[1] > want.shape[1]:
            raise ValueError(f"starting weights take {have.shape[1]} input channels, the network {want.shape[1]}")
        if have.shape[1] < want.shape[1]:
            extra = want.new_zeros((have.shape[0], want.shape[1] - have.shape[1]) + tuple(have.shape[2:]))
            widened[name] = torch.cat([have, extra], dim=1)
    return widened
