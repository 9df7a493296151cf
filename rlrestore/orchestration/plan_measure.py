"""Shape-only measurements on the ``meta`` device: FLOPs and activation bytes of a pass.

* FLOPs: the formulas of ``torch.utils.flop_counter`` (multiply-adds x 2 of matmuls, convolutions,
  attention), those ``FlopCounterMode`` applies, with one correction: torch's formula for ``convolution_backward`` ignores ``groups``
  and counts a depthwise convolution's weight gradient as a dense one (for SANA's depthwise 3x3
  convolutions, 30x the real work); here both gradients of a convolution cost what its forward does.
* Attention (``F.scaled_dot_product_attention``) runs as a fused kernel does on a GPU (flash /
  memory-efficient attention): its FLOPs are torch's SDPA formulas, it keeps q, k, v and the output
  for backward and never the [s_q, s_k] score matrix, which the meta device's math path would
  materialise (tens of GiB for the integrator's 1,500-token sequences).
* Activations of a trained pass: the bytes autograd saves for backward (``saved_tensors_hooks``),
  each storage once, the modules' own weights excluded.
* Activations of an inference pass: the peak of the bytes alive at once, followed op by op.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any,
    **kwargs: Any,
) -> int:
    """Input and weight gradients of a convolution each cost one forward (grouped ones included)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the grouped-convolution backward corrected."""
    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
    )


def _storage_key(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _weight_keys(modules: Iterable[nn.Module]) -> set[int]:
    return {_storage_key(t) for m in modules for t in [*m.parameters(), *m.buffers()]}


_FORMULAS = {**flop_registry, torch.ops.aten.convolution_backward: shape_wrapper(_conv_backward_flop)}


class _Meter(TorchDispatchMode):
    """Counts FLOPs with the formulas of ``flop_counter()`` and, with ``ignore`` given, follows every
    storage an op creates until the last tensor viewing it is freed (the peak of live bytes).

    Unlike ``FlopCounterMode`` it does not try to decompose each op it has no formula for (the
    composite ops with matmuls inside have decomposed before a dispatch mode sees them), which makes
    a full-size pass on meta several times faster; ``tests/test_plan.py`` checks both count alike.
    """

    def __init__(self, ignore: set[int] | None = None) -> None:
        super().__init__()
        self.flops = 0
        self.ignore, self.views, self.sizes = ignore, {}, {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.views[key] -= 1
        if self.views[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.views[key]

    def _follow(self, out: Any) -> None:
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or _storage_key(tensor) in self.ignore:
                continue
            key = _storage_key(tensor)
            if key not in self.views:
                self.views[key], self.sizes[key] = 0, tensor.untyped_storage().nbytes()
                self.live += self.sizes[key]
                self.peak = max(self.peak, self.live)
            self.views[key] += 1
            weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if self.ignore is not None:
            self._follow(out)
        return out


class _FusedAttention(torch.autograd.Function):
    """Shape-only SDPA that saves what a fused kernel saves and adds its FLOPs to a meter."""

    @staticmethod
    def forward(ctx, meter: _Meter, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        meter.flops += sdpa_flop_count(q.shape, k.shape, v.shape)
        ctx.meter = meter
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor]:
        q, k, v, _ = ctx.saved_tensors
        ctx.meter.flops += sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)
        return None, q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _FusedSDPA(TorchFunctionMode):
    """Routes 4-D ``F.scaled_dot_product_attention`` calls through :class:`_FusedAttention`."""

    def __init__(self, meter: _Meter) -> None:
        super().__init__()
        self.meter = meter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (*args, *(kwargs.get(n) for n in ("query", "key", "value")))[:3]
            if q.ndim == 4 and k.ndim == 4 and q.shape[1] % k.shape[1] == 0:
                return _FusedAttention.apply(self.meter, q, k, v)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class PassCost:
    """FLOPs of a pass (forward, plus backward when it trains), of its forward alone, and its
    activation bytes."""

    flops: int
    activation_bytes: int
    forward_flops: int


def measure_inference(run: Callable[[], Any], modules: Iterable[nn.Module], inputs: Iterable[Tensor] = ()) -> PassCost:
    """FLOPs and peak live bytes of ``run()`` under ``no_grad``; weights and ``inputs`` not counted."""
    meter = _Meter(_weight_keys(modules) | {_storage_key(t) for t in inputs})
    with torch.no_grad(), meter, _FusedSDPA(meter):
        result = run()
        del result
    return PassCost(meter.flops, meter.peak, meter.flops)


def measure_training(run: Callable[[], Tensor], modules: Iterable[nn.Module]) -> PassCost:
    """FLOPs of ``run()`` (a scalar loss) and its backward, and the bytes saved for backward."""
    modules = list(modules)
    weights = _weight_keys(modules)
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with _Meter() as meter, _FusedSDPA(meter):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = run()
        forward = meter.flops
        loss.backward()
    for module in modules:
        module.zero_grad(set_to_none=True)
    return PassCost(meter.flops, sum(saved.values()), forward)
