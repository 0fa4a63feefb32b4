"""Per-record gradient norms and clipped gradient sums, layer by layer, for one-pass ghost clipping.

:class:`fedmm.privacy.ghost.OnePassGradSampleModule` keeps each supported layer's input ``a``
and output gradient ``g`` from one backward pass of the summed per-record losses. This
module turns them into, per layer:

- :func:`layer_norms`: each record's squared gradient norm over the layer's trainable
  parameters (float64), a bound on the entries the clipped sum multiplies (which decides
  whether float32 is wide enough), and the explicit per-record gradients when those were the
  cheaper way to the norm (they are then reused for the sum);
- :func:`clip_into`: ``.grad`` of each parameter set to ``sum_i c_i grad_i`` for the records'
  clipping factors ``c_i``, without a second backward pass.

Layers: ``nn.Linear`` (any number of positions), ``nn.Conv1d`` and ``nn.Conv2d`` (one group,
zero padding), ``nn.Embedding`` (dense, no ``max_norm`` or frequency scaling), ``nn.GroupNorm``
and ``nn.LayerNorm``. For a layer over positions ``t`` (sequence tokens, convolution windows)
the weight gradient of record i is ``sum_t g_t a_t^T``; its squared norm is either taken from
that explicit matrix (cost ~ ``T * out * in``) or as the ghost norm
``sum_{t,s} (a_t . a_s)(g_t . g_s)`` (cost ~ ``T^2 * (out + in)``). A Linear takes whichever
costs less for its shapes. A convolution's clipped sum over windows costs ``T * out * in`` a
record either way, so it forms the explicit gradients (reused for the sum) unless they would
exceed ``EXPLICIT_MAX`` floats, and only then takes the ghost norm. An embedding's is ``sum_{t,s} [id_t = id_s] (g_t . g_s)``; a norm layer's
per-record gradients (one value per channel) are formed explicitly (Opacus' own samplers).
Convolution windows are gathered from the padded input with a cached index (:func:`_windows`).

Everything here is computed in the dtype of ``a`` and ``g``: an overflow there makes a norm inf or
NaN (never a wrong finite number), and the caller then takes the whole step again from float64
copies of ``a`` and ``g``; a record whose norm is still not finite is left out.

Underflow goes the other way: every norm that is a factor of a record's norm is taken as an upper
bound allowing for it (:mod:`fedmm.privacy.norm_bounds`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, cast

import torch
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from torch import Tensor, nn

from fedmm.privacy.norm_bounds import gram_lost, lost, lost_tensor, row_bounds

__all__ = ["LayerNorms", "all_norms", "clip_into", "layer_norms", "row_norms", "supports", "zero_rows"]

EMBEDDING_GRAM_MAX = 256  # longer token sequences take Opacus' sort-based embedding norm (no L x L matrix)
EXPLICIT_MAX = 1 << 22  # a convolution's per-record weight gradients up to this many floats (16 MiB) are formed explicitly


def row_norms(x: Tensor) -> Tensor:
    """Each record's (row's) Euclidean norm over all its other dimensions, in float64 (no overflow)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=torch.float64)


def zero_rows(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` with the rows (records) where ``keep`` is False set to 0 (selected, never multiplied by 0)."""
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def supports(layer: nn.Module) -> bool:
    """Whether :func:`layer_norms` and :func:`clip_into` handle ``layer`` exactly (else: Opacus' two passes)."""
    kind = type(layer)
    if kind in (nn.Linear, nn.GroupNorm):
        return True
    if kind is nn.LayerNorm:
        return layer.bias is not None  # Opacus' sampler needs it
    if kind in (nn.Conv1d, nn.Conv2d):
        conv = cast(nn.Conv1d | nn.Conv2d, layer)
        return conv.groups == 1 and conv.padding_mode == "zeros"
    if kind is nn.Embedding:
        embedding = cast(nn.Embedding, layer)
        return not (embedding.sparse or embedding.scale_grad_by_freq or embedding.max_norm is not None)
    return False


Block = tuple[tuple[nn.Parameter, ...], Tensor]  # parameters, and their per-record gradients side by side: [n, their sizes' sum]


class LayerNorms(NamedTuple):
    """One layer's share of each record's gradient: ``squared`` norm and ``largest`` entry bound
    (float64, ``[n]``), and the explicit per-record gradients when they were formed (else None):
    blocks of one or more of the layer's parameters, in their order, each block's gradients one
    ``[n, ...]`` tensor (an embedding's: its padding-masked ``[n, L, dim]`` output gradients)."""

    squared: Tensor
    largest: Tensor
    per_record: list[Block] | None
    windows: Tensor | None = None  # the ``[n, T, in]`` inputs per position, when formed (convolutions)


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if isinstance(p, nn.Parameter) and p.requires_grad]


def _trains(layer: nn.Module, name: str) -> bool:
    """Whether ``layer`` has a parameter ``name`` that requires a gradient (read from its own table)."""
    p = layer._parameters.get(name)
    return p is not None and p.requires_grad


def _positions(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, G)``: ``[n, T, in]`` inputs and ``[n, T, out]`` output gradients per position (window)."""
    n = g.shape[0]
    if isinstance(layer, nn.Linear):
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    return _windows(cast(nn.Conv1d | nn.Conv2d, layer), a), g.reshape(n, g.shape[1], -1).transpose(1, 2)


def _geometry(conv: nn.Conv1d | nn.Conv2d, size: tuple[int, ...]) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, ...]]:
    """A convolution as a 2-D one (a Conv1d has height 1): its ``F.pad`` amounts (left, right, top,
    bottom), the padded input's ``(height, width)``, and ``(kh, kw, sh, sw, dh, dw)``."""
    two_d = isinstance(conv, nn.Conv2d)
    height, width = (size[-2], size[-1]) if two_d else (1, size[-1])
    kh, kw = conv.kernel_size if two_d else (1, conv.kernel_size[0])
    sh, sw = conv.stride if two_d else (1, conv.stride[0])
    dh, dw = conv.dilation if two_d else (1, conv.dilation[0])
    if conv.padding == "same":  # stride 1 (torch's rule); an odd total puts the extra zero after, as torch does
        pad_h, pad_w = dh * (kh - 1), dw * (kw - 1)
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    elif conv.padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        ph, pw = cast(tuple[int, int], conv.padding) if two_d else (0, cast(tuple[int], conv.padding)[0])
        pads = (pw, pw, ph, ph)
    return pads, (height + pads[2] + pads[3], width + pads[0] + pads[1]), (kh, kw, sh, sw, dh, dw)


@functools.lru_cache(maxsize=256)
def _window_index(channels: int, height: int, width: int, kernel: tuple[int, ...]) -> Tensor:
    """Where each window's inputs lie in a record's flattened padded ``[channels, height, width]``:
    ``[T * channels * kh * kw]``, windows in output order, each in the weight's ``(in, kh, kw)`` order."""
    kh, kw, sh, sw, dh, dw = kernel
    rows, cols = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    at = (
        (torch.arange(rows) * sh * width).view(-1, 1, 1, 1, 1) + (torch.arange(cols) * sw).view(1, -1, 1, 1, 1)
        + (torch.arange(channels) * height * width).view(1, 1, -1, 1, 1)
        + (torch.arange(kh) * dh * width).view(1, 1, 1, -1, 1) + (torch.arange(kw) * dw).view(1, 1, 1, 1, -1)
    )
    return at.reshape(-1)


def _windows(conv: nn.Conv1d | nn.Conv2d, a: Tensor) -> Tensor:
    """``[n, T, in * kh * kw]``: each output position's input window, in the weight's layout.

    One gather per record row (``index_select`` with a cached index) from the padded input: 2-4x
    faster at our sizes than a strided copy of an ``unfold`` view (Opacus' ``unfold2d``), which
    moves a few values at a time.
    """
    pads, (height, width), kernel = _geometry(conv, tuple(a.shape))
    padded = nn.functional.pad(a, pads) if any(pads) else a
    n, channels = a.shape[0], a.shape[1]
    index = _window_index(channels, height, width, kernel).to(a.device)
    return padded.reshape(n, -1).index_select(1, index).view(n, -1, channels * kernel[0] * kernel[1])


def _ghost_cheaper(positions: int, fan_in: int, fan_out: int) -> bool:
    return positions * (fan_in + fan_out) < fan_in * fan_out


def _conv_ghost(records: int, positions: int, fan_in: int, fan_out: int) -> bool:
    """Whether a convolution takes the ghost norm: only when its explicit per-record gradients
    would not fit in ``EXPLICIT_MAX`` floats. The clipped sum over windows costs as much as forming
    those gradients (``T * out * in`` a record), so the ghost norm only adds work where they fit."""
    return records * fan_in * fan_out > EXPLICIT_MAX and _ghost_cheaper(positions, fan_in, fan_out)


def layer_norms(layer: nn.Module, a: Tensor, g: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> LayerNorms:
    """Each record's squared gradient norm over ``layer``'s trainable parameters (see the module).
    ``stats``: a GroupNorm's per-record, per-group mean and inverse deviation from its forward pass (else recomputed)."""
    if isinstance(layer, nn.Embedding):
        return _embedding_norms(layer, a, g, row_bounds(g))
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
        return _explicit(layer, a, g, stats)
    if not isinstance(layer, nn.Linear):  # a convolution: T windows of in_channels x kernel inputs
        weight = cast(nn.Parameter, layer.weight)
        if not (weight.requires_grad and _conv_ghost(g.shape[0], g[0, 0].numel(), weight[0].numel(), int(weight.shape[0]))):
            return _explicit(layer, a, g)
    g_norm, a_norm = row_bounds(g), row_bounds(a)
    ga = g_norm * a_norm
    largest = torch.maximum(ga, g_norm)  # bounds every entry of g and of a per-record gradient
    if a.dim() == 2 and isinstance(layer, nn.Linear):
        # one position: the weight gradient g a^T has norm |g| |a|, the bias gradient |g|
        has_weight, has_bias = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
        if has_weight and has_bias:
            squared = torch.addcmul(g_norm.square(), ga, ga)
        else:
            squared = ga.square() if has_weight else g_norm.square() if has_bias else torch.zeros_like(g_norm)
        return LayerNorms(squared, largest, None)
    # the ghost norm over pairs of positions
    big_a, big_g = _positions(layer, a, g)
    big_a = big_a.to(big_g.dtype)
    squared = torch.zeros_like(g_norm)
    if layer.weight.requires_grad:  # type: ignore[union-attr]
        gram = torch.bmm(big_a, big_a.transpose(1, 2)) * torch.bmm(big_g, big_g.transpose(1, 2))
        # a convolution's windows hold each input entry at most once per kernel position: sum_t |a_t|^2 <= k |a|^2
        repeats = 1 if isinstance(layer, nn.Linear) else math.prod(cast(nn.Conv1d | nn.Conv2d, layer).kernel_size)
        squared += gram.sum(dim=(1, 2)).double() + gram_lost(big_a, big_g, a_norm.square() * repeats, g_norm.square())
    if layer.bias is not None and layer.bias.requires_grad:  # type: ignore[union-attr]
        squared += row_bounds(big_g.sum(dim=1)).square()
    return LayerNorms(squared, largest, None, None if isinstance(layer, nn.Linear) else big_a)


def all_norms(captured: list[tuple[nn.Module, Tensor, Tensor]], n: int, device: torch.device,
              stats: dict[nn.Module, tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor, list[LayerNorms | None]]:
    """Each record's gradient norm over all ``(layer, a, g)`` in ``captured`` (float64), its largest
    entry bound over them, and each layer's :func:`layer_norms` (None for a Linear on one position:
    :func:`clip_into` needs nothing of it). A Linear on one position multiplies no entry above the
    record's norm (``|g_ij a_ik| <= |g_i| |a_i|`` and ``|g_ij| <= |g_i|``): its bound is the norm itself, so
    for a model of such layers only (the default AV-MNIST model) the bound returned *is* the norms tensor.

    Linear layers on one position (``a`` of ``[n, in]``) are taken together: their ``|g_i|`` and
    ``|a_i|`` are stacked and combined in a handful of operations for all of them at once (the
    same values as :func:`layer_norms` but for the underflow allowance, here the widest row's for
    all; a per-step cost that is mostly call overhead otherwise).
    """
    flat = [i for i, (layer, a, _) in enumerate(captured) if type(layer) is nn.Linear and a.dim() == 2]
    saved = stats or {}
    found: list[LayerNorms | None] = [None if i in flat else layer_norms(*captured[i], saved.get(captured[i][0])) for i in range(len(captured))]
    parts, bounds = [f.squared for f in found if f is not None], [f.largest for f in found if f is not None]
    if flat:
        layers = [cast(nn.Linear, captured[i][0]) for i in flat]
        count = len(flat)
        # every |g_i| then every |a_i|, in g's and a's dtype first (an overflow shows as inf): [2L, n] in one stack
        # (float64 from here: in float32 the square of a norm below 1e-19 would underflow)
        tensors = [captured[i][2] for i in flat] + [captured[i][1] for i in flat]
        lengths, widest, dtype, mixed = [], tensors[0], tensors[0].dtype, False
        for t in tensors:
            lengths.append(torch.linalg.vector_norm(t, dim=1))
            widest = t if t.shape[1] > widest.shape[1] else widest
            mixed |= t.dtype is not dtype
        if mixed:  # layers of more than one dtype: the largest loss of any row
            widest = max(tensors, key=lambda u: lost(u, u.shape[1]))
        rows = torch.stack(lengths).double()
        # each squared norm raised by what underflow can have taken from the widest row (see the module): upper bounds
        rows = torch.addcmul(lost_tensor(widest, widest.shape[1]), rows, rows)
        g_sq, a_sq = rows[:count], rows[count:]
        weight = [_trains(layer, "weight") for layer in layers]
        bias = [_trains(layer, "bias") for layer in layers]
        if all(weight) and all(bias):
            squared = torch.addcmul(g_sq, g_sq, a_sq)  # |g a^T|^2 + |g|^2
        else:
            on = torch.tensor([weight, bias], dtype=torch.float64, device=device).unsqueeze(-1)  # [2, L, 1]
            squared = g_sq * (a_sq * on[0] + on[1])
        parts.append(squared.sum(dim=0))
    if not parts:
        zero = torch.zeros(n, dtype=torch.float64, device=device)
        return zero, zero, []
    norms = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(dim=0)).sqrt()
    if not bounds:
        return norms, norms, found
    largest = bounds[0] if len(bounds) == 1 else torch.stack(bounds).amax(dim=0)
    return norms, torch.maximum(largest, norms) if flat else largest, found


def _per_record(layer: nn.Module, a: Tensor, g: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> list[Block]:
    """Explicit per-record gradients of a norm layer or a convolution (windows x gradients), as blocks
    (see :class:`LayerNorms`): a GroupNorm's weight and bias in one ``[n, 2C]`` tensor."""
    n = g.shape[0]
    a = a if a.dtype == g.dtype else a.to(g.dtype)
    if isinstance(layer, nn.GroupNorm):  # Opacus' compute_group_norm_grad_sample, with sums for its einsums
        channels, groups = layer.num_channels, layer.num_groups
        params = tuple(p for p in (layer.weight, layer.bias) if p.requires_grad)
        flat_g = g.reshape(n, channels, -1)
        grads = torch.empty(n, channels * len(params), dtype=g.dtype, device=g.device)  # weight's, then bias's
        # the bias's per-record gradients: sum_t g_t per channel
        g_sum = grads[:, -channels:] if layer.bias.requires_grad else torch.empty(n, channels, dtype=g.dtype, device=g.device)
        torch.sum(flat_g, dim=2, out=g_sum)
        if layer.weight.requires_grad:
            weight = grads[:, :channels]
            if stats is None:
                torch.sum((nn.functional.group_norm(a, groups, eps=layer.eps) * g).reshape(n, channels, -1), dim=2, out=weight)
            else:
                # sum_t (a_t - mean) rstd g_t = rstd (sum_t a_t g_t - mean sum_t g_t), per channel, with the
                # group's mean and rstd from the forward pass: no second normalisation of the input
                torch.sum(a.reshape(n, channels, -1) * flat_g, dim=2, out=weight)
                mean, rstd = (s.unsqueeze(-1) if s.dtype == g.dtype else s.to(g.dtype).unsqueeze(-1) for s in stats)
                per_group = channels // groups
                weight.view(n, groups, per_group).addcmul_(mean, g_sum.view(n, groups, per_group), value=-1.0).mul_(rstd)
        return [(params, grads)]
    if isinstance(layer, nn.LayerNorm):
        return [((p,), t.reshape(n, -1)) for p, t in compute_layer_norm_grad_sample(layer, [a], g).items()]
    conv = cast(nn.Conv1d | nn.Conv2d, layer)
    big_g = g.reshape(n, g.shape[1], -1)  # [n, out, T]
    blocks: list[Block] = []
    if conv.weight.requires_grad:
        blocks.append(((cast(nn.Parameter, conv.weight),), torch.bmm(big_g, _windows(conv, a))))  # [n, out, in * kh * kw]
    if conv.bias is not None and conv.bias.requires_grad:
        blocks.append(((cast(nn.Parameter, conv.bias),), big_g.sum(dim=2)))
    return blocks


def _explicit(layer: nn.Module, a: Tensor, g: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> LayerNorms:
    """Norms from explicit per-record gradients. Every entry the clipped sum multiplies is one
    of theirs, so a record's norm bounds them. Each block's norms are taken in its dtype (an
    overflow shows as inf), joined with ``hypot`` (no square to overflow), then squared in float64."""
    blocks = _per_record(layer, a, g, stats)
    norm = functools.reduce(torch.hypot, [torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for _, t in blocks]).double()
    return LayerNorms(norm.square(), norm, blocks)


def _embedding_norms(layer: nn.Embedding, ids: Tensor, g: Tensor, g_norm: Tensor) -> LayerNorms:
    """Record i's embedding gradient adds up its positions' ``g_t`` per distinct id."""
    n = g.shape[0]
    ids = ids.reshape(n, -1)
    g = g.reshape(n, ids.shape[1], -1)
    if layer.padding_idx is not None:  # the padding row gets no gradient
        g = g.masked_fill((ids == layer.padding_idx).unsqueeze(-1), 0.0)
    squared = torch.zeros_like(g_norm)
    if layer.weight.requires_grad:
        if ids.shape[1] == 1:
            squared = row_bounds(g).square()
        elif ids.shape[1] <= EMBEDDING_GRAM_MAX:
            same = ids.unsqueeze(2) == ids.unsqueeze(1)
            squared = (torch.bmm(g, g.transpose(1, 2)) * same).sum(dim=(1, 2)).double()
        else:
            squared = compute_embedding_norm_sample(layer, [ids], g)[layer.weight].double().square()
    return LayerNorms(squared, g_norm, [((cast(nn.Parameter, layer.weight),), g)])  # the (padding-masked) gradients, for clip_into


def clip_into(layer: nn.Module, a: Tensor, g: Tensor, norms: LayerNorms | None, coef: Tensor, keep: Tensor | None = None,
              out: dict[nn.Parameter, Tensor] | None = None) -> None:
    """Set ``.grad`` of ``layer``'s trainable parameters to ``sum_i coef_i grad_i``, computed in ``coef``'s dtype.

    ``keep`` (bool ``[n]``, or None for all): records left out, whose rows of ``a``, ``g`` and the
    per-record gradients are set to 0 before any product (never ``0 * NaN``). ``out``: a tensor of
    each parameter's shape and dtype to hold its ``.grad`` (written in place and made the ``.grad``),
    else a new tensor.
    """
    if isinstance(layer, nn.Linear):  # never explicit per-record gradients (layer_norms)
        if keep is not None:
            a, g = zero_rows(a, keep), zero_rows(g, keep)
        _clip_linear(layer, a, g, coef.view(-1, *[1] * (g.dim() - 1)), out)
        return
    blocks = [] if norms is None or norms.per_record is None else norms.per_record
    if keep is not None:
        a, g = zero_rows(a, keep), zero_rows(g, keep)
        blocks = [(params, zero_rows(t, keep)) for params, t in blocks]
    if blocks and not isinstance(layer, nn.Embedding):  # explicit per-record gradients: one product a block
        for params, grads in blocks:
            _clip_block(params, grads, coef, out)
        return
    for p in _trainable(layer):
        windows = norms.windows if keep is None and norms is not None and norms.windows is not None and norms.windows.dtype == coef.dtype else None
        _set_grad(p, _clipped(layer, p, a, g, blocks, coef, windows), out)


def _clip_block(params: tuple[nn.Parameter, ...], grads: Tensor, coef: Tensor, out: dict[nn.Parameter, Tensor] | None) -> None:
    """``.grad`` of ``params`` from their per-record gradients ``grads`` (``[n, ...]``, side by side):
    ``sum_i coef_i grads_i`` as one matrix-vector product, written straight into ``out``'s places
    when they are side by side there in ``coef``'s dtype."""
    flat = grads.reshape(grads.shape[0], -1)
    place = _span(out, params)
    if place is not None and place.dtype == coef.dtype == flat.dtype:
        torch.mv(flat.t(), coef, out=place)
    else:
        summed = torch.mv((flat if flat.dtype == coef.dtype else flat.to(coef.dtype)).t(), coef)
        if place is None:  # no buffer, or places apart: each parameter's part on its own
            at = 0
            for p in params:
                _set_grad(p, summed[at : at + p.numel()].view(p.shape), out)
                at += p.numel()
            return
        place.copy_(summed)
    for p in params:
        p.grad = out[p]  # type: ignore[index]  # a span was found: out is given


def _span(out: dict[nn.Parameter, Tensor] | None, params: tuple[nn.Parameter, ...]) -> Tensor | None:
    """One 1-D view over ``out[p]`` for every ``p`` of ``params``, when they lie side by side in that
    order (one buffer's consecutive places, as :class:`fedmm.privacy.ghost.OnePassGradSampleModule`
    lays a layer's parameters out); else None."""
    if out is None:
        return None
    first = out[params[0]]
    at, size, total = first.data_ptr(), first.element_size(), 0
    for p in params:
        place = out[p]
        if place.data_ptr() != at + total * size or place.dtype != first.dtype or not place.is_contiguous():
            return None
        total += place.numel()
    return first.view(-1) if len(params) == 1 else first.as_strided((total,), (1,))


def _clip_linear(layer: nn.Module, a: Tensor, g: Tensor, coef: Tensor, out: dict[nn.Parameter, Tensor] | None) -> None:
    """:func:`clip_into` for an ``nn.Linear``, ``coef`` shaped to multiply ``g`` (``[n, 1]`` for ``g``
    of ``[n, out]``): the weight and bias from one scaled output gradient,
    ``sum_i c_i g_i a_i^T = (c g)^T a`` and ``sum_i c_i g_i``, in ``coef``'s dtype."""
    dtype = coef.dtype
    scaled = (g if g.dtype == dtype else g.to(dtype)) * coef
    flat = scaled if scaled.dim() == 2 else scaled.reshape(-1, g.shape[-1])
    params = layer._parameters
    weight, bias = params["weight"], params.get("bias")
    if weight is not None and weight.requires_grad:
        inputs = a if a.dim() == 2 else a.reshape(-1, a.shape[-1])
        inputs = inputs if inputs.dtype == dtype else inputs.to(dtype)
        if (target := _same_dtype(out, weight, dtype)) is not None:
            weight.grad = torch.mm(flat.t(), inputs, out=target)  # straight into its place: no copy
        else:
            _set_grad(weight, flat.t() @ inputs, out)
    if bias is not None and bias.requires_grad:
        if (target := _same_dtype(out, bias, dtype)) is not None:
            bias.grad = torch.sum(flat, dim=0, out=target)
        else:
            _set_grad(bias, flat.sum(dim=0), out)


def _same_dtype(out: dict[nn.Parameter, Tensor] | None, p: nn.Parameter, dtype: torch.dtype) -> Tensor | None:
    """``out[p]`` when there is one of ``dtype`` (a product can then be written into it directly), else None."""
    target = None if out is None else out[p]
    return target if target is not None and target.dtype == dtype else None


def _set_grad(p: nn.Parameter, value: Tensor, out: dict[nn.Parameter, Tensor] | None) -> None:
    """``p.grad = value`` in ``p``'s dtype, written into ``out[p]`` when ``out`` is given."""
    if out is None:
        p.grad = value.to(p.dtype)
    else:
        p.grad = out[p].copy_(value)


def _clipped(layer: nn.Module, p: nn.Parameter, a: Tensor, g: Tensor, blocks: list[Block], coef: Tensor, windows: Tensor | None) -> Tensor:
    dtype = coef.dtype
    if isinstance(layer, nn.Embedding):
        h = blocks[0][1].to(dtype) * coef.view(-1, 1, 1)  # the padding-masked [n, L, dim] gradients
        out = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return out.index_add_(0, a.reshape(-1), h.reshape(-1, h.shape[-1]))
    scaled = g.to(dtype) * coef.view(-1, *[1] * (g.dim() - 1))
    # convolutions (a Linear is clipped in clip_into): the weight's gradient of the scaled output gradients, sum over records and windows
    if p is layer.bias:
        return scaled.reshape(scaled.shape[0], scaled.shape[1], -1).sum(dim=(0, 2))
    big_a, big_g = _positions(layer, a.to(dtype), scaled) if windows is None else (windows, scaled.reshape(scaled.shape[0], scaled.shape[1], -1).transpose(1, 2))
    return torch.einsum("nto,nti->oi", big_g, big_a).reshape(p.shape)
