"""AWing FAN: the 98-point (WFLW) face-landmark network that face-restoration papers use for LMD.

Reference: facexlib (https://github.com/xinntao/facexlib, MIT licence, Copyright (c) 2020 Xintao
Wang), ``facexlib/alignment/awing_arch.py`` (``FAN``, ``HourGlass``, ``ConvBlock``,
``CoordConvTh``, ``AddCoordsTh``, ``calculate_points``, ``FAN.get_landmarks``) and
``facexlib/alignment/__init__.py`` (``init_alignment_model('awing_fan')``: ``FAN(num_modules=4,
num_landmarks=98)`` loading ``torch.load(path)['state_dict']`` with ``strict=True``); facexlib took
the network from Adaptive Wing Loss (Wang et al., ICCV 2019). This is an independent
re-implementation: module and parameter names are facexlib's, so the published
``alignment_WFLW_4HG.pth`` loads with ``strict=True``; the computation is the same.

Differences from the reference, none of which changes the published model's output:

- ``hourglass_depth`` and ``width`` are constructor arguments (facexlib fixes them at 4 and 256;
  with ``width`` w the stem has w/4 and w/2 channels, as 64 and 128 are for 256) so tests can
  build a tiny network with the same code; the defaults are the published model's;
- facexlib's unused ``gray_scale`` switch (both branches build the same layer), ``device``
  attribute and the unused ``BasicBlock`` class are left out;
- :meth:`FAN.get_landmarks` takes a batch of RGB tensors instead of one BGR ``uint8`` array and
  does the resize in torch (see :func:`fan_input`); :func:`heatmap_points` is ``calculate_points``
  applied image by image (see there for its corner cases).

The network takes ``[N, 3, 256, 256]`` RGB in [0, 1] (the CoordConv layers add coordinate
channels for exactly 256x256 and 64x64 maps) and returns, per stacked hourglass, ``[N, L + 1,
64, 64]`` heatmaps: one per landmark and a last "boundary" map that the next hourglass reads
(through its CoordConv) where the boundary map exceeds 0.05.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FAN",
    "FAN_HEATMAP_SIZE",
    "FAN_INPUT_SIZE",
    "AddCoordsTh",
    "ConvBlock",
    "CoordConvTh",
    "HourGlass",
    "fan_input",
    "heatmap_points",
]

FAN_INPUT_SIZE = 256
"""Side of the square RGB image the FAN takes (facexlib resizes every face to it)."""
FAN_HEATMAP_SIZE = 64
"""Side of the heatmaps (input / 4); landmark coordinates are decoded on this grid."""
_BOUNDARY_THRESHOLD = 0.05  # heatmap value above which a cell counts as boundary (reference)


class AddCoordsTh(nn.Module):
    """Append coordinate channels to a ``[N, C, x_dim, y_dim]`` map (no parameters).

    Appended in this order: the row coordinate (facexlib calls it ``xx``: it varies along dim 2),
    the column coordinate (``yy``, along dim 3), both mapped linearly from ``0 .. dim-1`` to
    [-1, 1]; with ``with_r`` their radius divided by its maximum; with ``with_boundary`` and a
    ``heatmap``, the two coordinates again, zeroed where the heatmap's last channel (clamped to
    [0, 1]) is not above 0.05.
    """

    def __init__(self, x_dim: int = 64, y_dim: int = 64, with_r: bool = False, with_boundary: bool = False):
        super().__init__()
        self.x_dim = x_dim
        self.y_dim = y_dim
        self.with_r = with_r
        self.with_boundary = with_boundary

    def forward(self, input_tensor: Tensor, heatmap: Tensor | None = None) -> Tensor:
        batch, _, height, width = input_tensor.shape
        if (height, width) != (self.x_dim, self.y_dim):
            raise ValueError(
                f"AddCoordsTh made for {self.x_dim}x{self.y_dim} maps got {height}x{width} "
                f"(the FAN takes {FAN_INPUT_SIZE}x{FAN_INPUT_SIZE} images)"
            )
        device = input_tensor.device
        rows = torch.arange(self.x_dim, dtype=torch.float32, device=device) / (self.x_dim - 1) * 2 - 1
        cols = torch.arange(self.y_dim, dtype=torch.float32, device=device) / (self.y_dim - 1) * 2 - 1
        xx = rows.view(1, 1, -1, 1).expand(batch, 1, self.x_dim, self.y_dim)
        yy = cols.view(1, 1, 1, -1).expand(batch, 1, self.x_dim, self.y_dim)
        channels = [input_tensor, xx.to(input_tensor.dtype), yy.to(input_tensor.dtype)]
        if self.with_r:
            radius = torch.sqrt(torch.pow(xx, 2) + torch.pow(yy, 2))
            channels.append((radius / torch.max(radius)).to(input_tensor.dtype))
        if self.with_boundary and heatmap is not None:
            inside = torch.clamp(heatmap[:, -1:], 0.0, 1.0) > _BOUNDARY_THRESHOLD
            channels.append(torch.where(inside, channels[1], torch.zeros_like(channels[1])))
            channels.append(torch.where(inside, channels[2], torch.zeros_like(channels[2])))
        return torch.cat(channels, dim=1)


class CoordConvTh(nn.Module):
    """:class:`AddCoordsTh` then a convolution (``conv``) over input + coordinate channels.

    The convolution's input has ``in_channels`` + 2 (+1 with ``with_r``, +2 boundary channels with
    ``with_boundary`` unless ``first_one``: the first hourglass gets no heatmap). Returns the
    convolution's output and the last two channels it was given (the boundary channels when there
    are any).
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        with_r: bool,
        with_boundary: bool,
        in_channels: int,
        first_one: bool = False,
        **conv_kwargs,
    ) -> None:
        super().__init__()
        self.addcoords = AddCoordsTh(x_dim=x_dim, y_dim=y_dim, with_r=with_r, with_boundary=with_boundary)
        extra = 2 + int(with_r) + (2 if with_boundary and not first_one else 0)
        self.conv = nn.Conv2d(in_channels=in_channels + extra, **conv_kwargs)

    def forward(self, input_tensor: Tensor, heatmap: Tensor | None = None) -> tuple[Tensor, Tensor]:
        stacked = self.addcoords(input_tensor, heatmap)
        return self.conv(stacked), stacked[:, -2:]


def _conv3x3(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation multi-scale residual block (Bulat & Tzimiropoulos), ``in_planes -> out_planes``.

    Three chained BN-ReLU-conv3x3 steps with ``out/2``, ``out/4`` and ``out/4`` channels; their
    outputs are concatenated (``out`` channels) and added to the input, which goes through
    BN-ReLU-conv1x1 (``downsample``) when the channel counts differ.
    """

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        half, quarter = out_planes // 2, out_planes // 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        self.downsample: nn.Sequential | None = None
        if in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_planes),
                nn.ReLU(True),
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, bias=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), dim=1) + residual


class HourGlass(nn.Module):
    """One hourglass of ``depth`` levels on ``features``-channel 64x64 maps, after a CoordConv.

    Level ``k`` (``depth`` down to 1): upper branch ``b1_k``; lower branch 2x2 average pool,
    ``b2_k``, level ``k-1`` (or ``b2_plus_1`` at the bottom), ``b3_k``, nearest 2x upsampling;
    the two branches are summed. Submodule names are the reference's, registered in its order.
    """

    def __init__(self, depth: int = 4, features: int = 256, first_one: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"hourglass depth must be >= 1, got {depth}")
        self.depth = depth
        self.features = features
        self.coordconv = CoordConvTh(
            x_dim=FAN_HEATMAP_SIZE,
            y_dim=FAN_HEATMAP_SIZE,
            with_r=True,
            with_boundary=True,
            in_channels=features,
            first_one=first_one,
            out_channels=features,
            kernel_size=1,
            stride=1,
            padding=0,
        )
        self._generate_network(depth)

    def _generate_network(self, level: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(self.features, self.features))
        self.add_module(f"b2_{level}", ConvBlock(self.features, self.features))
        if level > 1:
            self._generate_network(level - 1)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(self.features, self.features))
        self.add_module(f"b3_{level}", ConvBlock(self.features, self.features))

    def _forward(self, level: int, inp: Tensor) -> Tensor:
        up1 = self._modules[f"b1_{level}"](inp)
        low1 = self._modules[f"b2_{level}"](F.avg_pool2d(inp, 2, stride=2))
        if level > 1:
            low2 = self._forward(level - 1, low1)
        else:
            low2 = self._modules[f"b2_plus_{level}"](low1)
        low3 = self._modules[f"b3_{level}"](low2)
        return up1 + F.interpolate(low3, scale_factor=2, mode="nearest")

    def forward(self, x: Tensor, heatmap: Tensor | None) -> tuple[Tensor, Tensor]:
        x, last_channel = self.coordconv(x, heatmap)
        return self._forward(self.depth, x), last_channel


class FAN(nn.Module):
    """Stacked-hourglass landmark network with CoordConv and boundary channels (AWing).

    Defaults are the published ``alignment_WFLW_4HG.pth`` model (``init_alignment_model('awing_fan')``):
    4 hourglasses of depth 4 on 256 channels, 98 WFLW landmarks; 24,153,036 parameters. Stem:
    CoordConv 7x7 stride 2 (3+3 -> width/4 channels, 128x128), BN-ReLU, ``conv2`` ConvBlock to
    width/2, 2x2 average pool (64x64), ``conv3``, ``conv4`` ConvBlock to ``width``. Hourglass
    ``i``: ``m{i}``, ``top_m_{i}`` ConvBlock, ``conv_last{i}`` 1x1, ``bn_end{i}``-ReLU, ``l{i}`` 1x1 to
    the ``num_landmarks + 1`` heatmaps; between hourglasses ``bl{i}`` (features) and ``al{i}``
    (heatmaps) are added to the hourglass's input for the next one.
    """

    def __init__(
        self,
        num_modules: int = 4,
        num_landmarks: int = 98,
        end_relu: bool = False,
        *,
        hourglass_depth: int = 4,
        width: int = 256,
    ) -> None:
        super().__init__()
        if num_modules < 1 or width < 16 or width % 16:
            raise ValueError(
                f"FAN needs num_modules >= 1 and width a multiple of 16; got {num_modules}, {width}"
            )
        self.num_modules = num_modules
        self.num_landmarks = num_landmarks
        self.end_relu = end_relu
        self.conv1 = CoordConvTh(
            x_dim=FAN_INPUT_SIZE,
            y_dim=FAN_INPUT_SIZE,
            with_r=True,
            with_boundary=False,
            in_channels=3,
            out_channels=width // 4,
            kernel_size=7,
            stride=2,
            padding=3,
        )
        self.bn1 = nn.BatchNorm2d(width // 4)
        self.conv2 = ConvBlock(width // 4, width // 2)
        self.conv3 = ConvBlock(width // 2, width // 2)
        self.conv4 = ConvBlock(width // 2, width)
        for i in range(num_modules):
            self.add_module(f"m{i}", HourGlass(hourglass_depth, width, first_one=i == 0))
            self.add_module(f"top_m_{i}", ConvBlock(width, width))
            self.add_module(f"conv_last{i}", nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(width))
            self.add_module(f"l{i}", nn.Conv2d(width, num_landmarks + 1, kernel_size=1, stride=1, padding=0))
            if i < num_modules - 1:
                self.add_module(f"bl{i}", nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0))
                self.add_module(
                    f"al{i}", nn.Conv2d(num_landmarks + 1, width, kernel_size=1, stride=1, padding=0)
                )

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``[N, 3, 256, 256]`` RGB in [0, 1] -> (heatmaps ``[N, L + 1, 64, 64]`` of every hourglass,
        the boundary channels each hourglass's CoordConv was given)."""
        x, _ = self.conv1(x)
        x = F.relu(self.bn1(x))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        previous = self.conv4(self.conv3(x))
        outputs: list[Tensor] = []
        boundary_channels: list[Tensor] = []
        heatmaps: Tensor | None = None
        for i in range(self.num_modules):
            hg, boundary_channel = self._modules[f"m{i}"](previous, heatmaps)
            ll = self._modules[f"top_m_{i}"](hg)
            ll = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](ll)))
            heatmaps = self._modules[f"l{i}"](ll)
            if self.end_relu:
                heatmaps = F.relu(heatmaps)
            outputs.append(heatmaps)
            boundary_channels.append(boundary_channel)
            if i < self.num_modules - 1:
                previous = previous + self._modules[f"bl{i}"](ll) + self._modules[f"al{i}"](heatmaps)
        return outputs, boundary_channels

    def get_landmarks(self, images: Tensor) -> Tensor:
        """Landmarks ``[N, L, 2]`` (x, y in pixels of each image) of RGB faces ``[N, 3, H, W]`` in [0, 1].

        facexlib's ``get_landmarks`` for a batch: :func:`fan_input`, the last hourglass's landmark
        heatmaps (the boundary map dropped), :func:`heatmap_points`, scaled by ``(W / 64, H / 64)``.
        """
        height, width = images.shape[-2:]
        heatmaps = self(fan_input(images))[0][-1][:, :-1]
        points = heatmap_points(heatmaps)
        scale = torch.tensor(
            [width / heatmaps.shape[-1], height / heatmaps.shape[-2]],
            dtype=points.dtype,
            device=points.device,
        )
        return points * scale


def fan_input(images: Tensor) -> Tensor:
    """RGB ``[N, 3, H, W]`` in [0, 1] -> the FAN's ``[N, 3, 256, 256]`` input in [0, 1].

    What facexlib does to an image file: the image is an 8-bit picture (values are rounded to
    multiples of 1/255, half to even, as rlrestore saves PNGs), ``cv2.resize(img, (256, 256))``
    (bilinear, half-pixel centres, no antialiasing, result rounded half up to 8 bits), ``/ 255``.
    For sides 256, 512 and 1024 this equals OpenCV exactly; for other scales OpenCV's fixed-point
    weights differ from exact bilinear by one grey level at some pixels.
    """
    levels = (images.float().clamp(0.0, 1.0) * 255.0).round()
    if tuple(levels.shape[-2:]) != (FAN_INPUT_SIZE, FAN_INPUT_SIZE):
        size = (FAN_INPUT_SIZE, FAN_INPUT_SIZE)
        levels = F.interpolate(levels, size=size, mode="bilinear", align_corners=False, antialias=False)
        levels = torch.floor(levels + 0.5)
    return levels / 255.0


def heatmap_points(heatmaps: Tensor) -> Tensor:
    """facexlib's ``calculate_points``, image by image: ``[N, L, H, W]`` heatmaps -> ``[N, L, 2]``
    (x, y) in heatmap cells (float64).

    Each landmark is its heatmap's argmax cell (the first on ties) moved a quarter cell towards the
    larger of its two horizontal neighbours and of its two vertical neighbours (no move on equality),
    plus half a cell. The neighbours are read from the flattened heatmap as facexlib reads them:
    index +-1 horizontally (wrapping into the next / previous row at the left and right edges,
    index -1 meaning the last cell) and +-W vertically, except that when any landmark of the image
    lies in the bottom row, every landmark of that image compares with the last cell instead of
    the cell below, and when any lies in the top row or at the first cell of the second row, with
    the first cell instead of the cell above (facexlib decides this over the batch it is given,
    which ``get_landmarks`` makes one image). Where facexlib fails (the argmax at the last cell, an
    index error there) the right neighbour is the peak itself.
    """
    batch, count, height, width = heatmaps.shape
    cells = height * width
    flat = heatmaps.reshape(batch, count, cells)
    index = flat.argmax(dim=2)
    points = torch.stack((index % width, torch.div(index, width, rounding_mode="floor")), dim=2).double()

    def at(positions: Tensor) -> Tensor:
        return flat.gather(2, positions.unsqueeze(2)).squeeze(2)

    right = at((index + 1).clamp(max=cells - 1))
    left = at(torch.remainder(index - 1, cells))
    last_row = ((index + width) >= cells).any(dim=1, keepdim=True)
    first_row = ((index - width) <= 0).any(dim=1, keepdim=True)
    below = torch.where(last_row, flat[:, :, cells - 1], at((index + width).clamp(max=cells - 1)))
    above = torch.where(first_row, flat[:, :, 0], at((index - width).clamp(min=0)))
    shift = torch.sign(torch.stack((right - left, below - above), dim=2)).double() * 0.25
    return points + shift + 0.5
