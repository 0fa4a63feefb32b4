"""Opacus' ghost clipping with less per-step bookkeeping (the same DP-SGD, cheaper to run).

Our models are small (tens of thousands of weights, a few steps per round), so an
Opacus step is dominated by per-tensor Python work, not arithmetic. Three parts of
it are replaced here by equivalent, cheaper code; the clipping rule, noise scale,
Poisson sampling and accounting stay Opacus' own:

- the per-sample gradient norm of ``nn.Linear`` on ``[batch, features]`` inputs (every
  Linear of our encoders and heads) is ``|grad_out_i| * |input_i|`` for the weight and
  ``|grad_out_i|`` for the bias, computed with two sums instead of Opacus' three
  ``einsum`` calls (a batched matmul each, several times slower at these sizes);
  sequence inputs still take Opacus' function. Registered for the whole process
  through Opacus' ``register_norm_sampler``, on import of this module;
- ``GhostClippingOptimizer`` (Opacus' ``DPOptimizerFastGradientClipping``, in
  :mod:`fedmm.privacy.dp_optimizers` with ``GradSampleClippingOptimizer``) keeps each
  clipped sum without copying it when the step is taken at once (a skipped step of several
  physical batches keeps a copy) and adds
  the Gaussian noise and divides by the expected batch size in one pass: the one-pass module
  below writes every clipped sum into one buffer (each ``.grad`` a view of it), which gets one
  draw for all its coordinates, added in place; other sums get one draw and one multi-tensor
  sum. The parent draws, adds and divides per tensor. The noise is i.i.d. N(0, (noise_multiplier * max_grad_norm)^2) per
  coordinate, drawn by :mod:`fedmm.privacy.noise` (AES-CTR keyed from ``os.urandom``; Opacus'
  ``torch.normal`` cuts every draw off at 5.77 standard deviations, which the accountant does
  not allow for). ``GradSampleClippingOptimizer`` draws its noise there too.
- a model whose every trainable layer is one :mod:`fedmm.privacy.ghost_norms` supports
  (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``nn.GroupNorm``,
  ``nn.LayerNorm``: the default AV-MNIST model and every fusion with CNN, bag-of-words or
  transformer encoders) gets ``OnePassGradSampleModule``: ghost clipping in one backward
  pass instead of Opacus' two. A recording ``forward`` (what a forward hook does, without
  ``nn.Module``'s slower call path for hooked modules) keeps each layer's input ``a_i`` and the
  output's place in the autograd graph (its ``GradientEdge``: the gradient asked for there
  is that of the layer's own output, even if an in-place op changes the tensor later).
  One ``torch.autograd.grad`` of the summed per-record losses gives every output gradient
  ``g_i`` and skips the (unclipped) parameter gradients; the per-record norms and the
  clipped sums ``sum_i c_i grad_i`` follow layer by layer from ``a_i`` and ``g_i``
  (:mod:`fedmm.privacy.ghost_norms`: ghost norms or explicit per-record gradients,
  whichever is cheaper for the layer's shapes), so the second backward pass Opacus takes
  to apply ``c_i`` is not needed (the "book-keeping" idea of Bu et al., "Differentially
  private optimization on large model at small cost", ICML 2023). Every other model (DPGRU,
  DPLSTM, grouped convolutions) keeps Opacus' own two-pass module;
- ``PrivacyEngine`` is Opacus' engine that hands out that optimizer, that module and the
  matching loss wrapper for ghost clipping, and ``GradSampleClippingOptimizer`` for the
  per-sample gradient modes (``hooks``, ``functorch``).

No record can make an update NaN or infinite (which the server would then reject, every
round: the record's presence would show whatever the noise). Per-record norms are taken
in float64 (a float32 input of 1e19 already overflows its square; the per-sample gradient
modes and the one-pass module keep float32 norms for a batch where none overflowed, and
take the batch again in float64 otherwise, as a float64 pass over every activation costs
more). The clipped sums are taken in float32 while every record's ``|g_i| |a_i|`` (or its
per-record gradient's norm, where that gradient is formed) stays below ``WIDE`` (1e30: no product can overflow, no
clipping factor underflow), in float64 otherwise. A record whose norm is still not
finite (its forward pass overflowed: inf, then NaN) has its rows set to zero before any
product (never ``0 * NaN``) and contributes exactly zero, within the clipping bound, so
the sensitivity and the guarantee are unchanged. Such records are counted in the
optimizer's ``nonfinite_records`` (and the one-pass module's), which the site's training
loop logs; the count is data-derived and never leaves the site. Opacus' two-pass module
cannot leave such a record out (its NaN reaches the whole batch through the second
backward pass); fedmm bounds every model input instead
(:data:`fedmm.models.evaluation.INPUT_BOUND`), so that no forward pass overflows.
A norm that is a product of factors is an upper bound allowing for underflow (:mod:`fedmm.privacy.norm_bounds`).

``tests/test_model_dp.py`` checks the result against per-sample clipped gradients
computed without Opacus, and the noise's standard deviation; ``tests/test_one_pass_clipping.py``
each layer type and the CNN fusions against torch.func and Opacus' hooks mode; ``tests/test_sensitivity.py``
that one extreme record moves a step by at most ``max_grad_norm``, in every mode.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import opacus
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS, AbstractGradSampleModule
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError, UnsupportedModuleError
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from fedmm.privacy.dp_optimizers import WIDE, GhostClippingOptimizer, GradSampleClippingOptimizer
from fedmm.privacy.ghost_norms import all_norms, clip_into, row_norms, supports
from fedmm.privacy.norm_bounds import ghost_bound

__all__ = ["GhostClippingOptimizer", "GradSampleClippingOptimizer", "OnePassGradSampleModule", "PrivacyEngine", "WIDE", "linear_norm_sample"]

@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms of ``layer`` (Opacus' ghost norm sampler, faster for 2-D inputs).

    Sample i's weight gradient is the outer product ``g_i a_i^T``, whose norm is ``|g_i| |a_i|``,
    computed in float64 (a norm beyond float32's range comes back as inf, never NaN from ``0 * inf``).
    """
    if backprops.dim() != 2:
        a, g = activations[0].to(backprops.dtype), backprops
        norms = compute_linear_norm_sample(layer, [a], g)
        if not all(bool(torch.isfinite(n).all()) for n in norms.values()):
            a, g = a.double(), g.double()  # float32 overflowed
            norms = compute_linear_norm_sample(layer, [a], g)
        if layer.weight in norms:  # the ghost sum's factors may have underflowed: its upper bound (fedmm.privacy.norm_bounds)
            norms[layer.weight] = ghost_bound(a.flatten(1, -2), g.flatten(1, -2), norms[layer.weight].double().square()).sqrt()
        return {p: v.to(backprops.dtype) for p, v in norms.items()}
    grad = row_norms(backprops)
    norms = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = (grad * row_norms(activations[0])).to(backprops.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = grad.to(backprops.dtype)
    return norms


def _own(layer: nn.Module) -> list[nn.Parameter]:
    """``layer.parameters(recurse=False)``, read from the layer's own table (the generator walks named members)."""
    return [p for p in layer._parameters.values() if p is not None]


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that hold a trainable parameter of their own, in ``modules()`` order
    (depth first, each module once), read from the modules' own tables (``modules()`` is a generator of
    generators: most of the cost of wrapping a small model)."""
    found, seen, todo = [], set(), [model]
    while todo:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if any(p.requires_grad for p in _own(layer)):
            found.append(layer)
        todo.extend(reversed([child for child in layer._modules.values() if child is not None]))
    return found


class OnePassGradSampleModule(GradSampleModuleFastGradientClipping):
    """Opacus' ghost-clipping module for models whose every trainable layer is one that
    :mod:`fedmm.privacy.ghost_norms` supports (Linear, Conv1d/2d, Embedding, GroupNorm, LayerNorm), clipping in one backward pass (:meth:`clipped_backward`) instead of two.

    Wrapping, hooks and ``_close`` do what Opacus' do, in one walk over the model where Opacus'
    take dozens (a round wraps and unwraps the model once: about 1 ms of Opacus' 1.5 ms for a CNN fusion).
    """

    nonfinite_records: int = 0  # records left out so far (their norm was not finite); site-local
    grad_buffer: torch.Tensor | None = None  # this step's clipped sums, every .grad a view of it (see _grad_buffer)

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", strict: bool = True,
                 force_functorch: bool = False, max_grad_norm: float = 1.0, use_ghost_clipping: bool = True, layers: list[nn.Module] | None = None) -> None:
        # The state GradSampleModuleFastGradientClipping.__init__ sets up (Opacus 1.6), built from one walk
        # (``layers``: the model's trainable layers, when the caller has them already)
        nn.Module.__init__(self)
        self._module = m
        layers = _trainable_layers(m) if layers is None else layers
        buffered = [f"{type(layer).__name__}" for layer in layers if any(True for _ in layer.buffers())]
        if buffered and strict:  # Opacus' validation: a trainable layer's buffers would not be private
            raise NotImplementedError(f"Model contains a trainable layer with buffers that Opacus doesn't currently support: {buffered}")
        trainable = self.__dict__["trainable_parameters"] = [p for layer in layers for p in _own(layer) if p.requires_grad]
        if len({id(p) for p in trainable}) < len(trainable):
            # one weight in two layers: each layer would set its .grad from its own records' share alone
            raise NotImplementedError("Parameter tying is not supported with Ghost Clipping: a trainable parameter belongs to more than one layer")
        for p in trainable:
            p.grad_sample = None  # type: ignore[attr-defined]
            p._forward_counter = 0  # type: ignore[attr-defined]
        self.__dict__.update(  # plain attributes, set without nn.Module's __setattr__ (a round wraps the model once)
            hooks_enabled=False, grad_accumulation_allowed=True, batch_first=batch_first, loss_reduction=loss_reduction,
            force_functorch=force_functorch, _trainable_layers=layers, max_grad_norm=max_grad_norm,
            use_ghost_clipping=use_ghost_clipping, _per_sample_gradient_norms=None,
        )
        self.add_hooks(loss_reduction=loss_reduction, batch_first=batch_first, force_functorch=force_functorch)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        layers = self._trainable_layers
        unsupported = sorted({type(m).__name__ for m in layers if not supports(m)})
        if not batch_first or unsupported:
            raise TypeError(
                f"OnePassGradSampleModule takes batch-first models whose trainable layers fedmm.privacy.ghost_norms supports; "
                f"got batch_first={batch_first}, unsupported layers {unsupported}. Fix: use Opacus' GradSampleModuleFastGradientClipping"
            )
        handles: list[_Recording] = []
        setattr(self._module, "autograd_grad_sample_hooks", handles)
        records: dict[nn.Module, list[tuple[torch.Tensor, GradientEdge]]] = {}  # layer -> [(input, output edge)] of this step
        self.__dict__.update(autograd_grad_sample_hooks=handles, _layers=layers, _records=records, hooks_enabled=True)
        handles.extend(_Recording(layer, self._capture) for layer in layers)

    def remove_hooks(self) -> None:
        self.__dict__.update(hooks_enabled=False, _records={})  # disable_hooks(), without nn.Module's __setattr__
        handles = self.__dict__.pop("autograd_grad_sample_hooks", None)
        for handle in handles or ():
            handle.remove()
        self._module.__dict__.pop("autograd_grad_sample_hooks", None)

    def cleanup(self) -> None:
        # Opacus' cleanup: the hooks, then every attribute Opacus puts on a parameter (here only on the
        # trainable ones, found at wrapping: no walk over the model)
        try:
            self.remove_hooks()
        finally:
            for p in self.trainable_parameters:
                attrs = p.__dict__
                for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS:
                    attrs.pop(attr, None)

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not (self.hooks_enabled and layer.training and torch.is_grad_enabled() and output.requires_grad):
            return None
        # The output's place in the autograd graph as the layer left it: the gradient asked for there is that
        # of the layer's own output, even if an in-place op (ReLU(inplace=True)) changes the tensor later.
        self._records.setdefault(layer, []).append((inputs[0], get_gradient_edge(output)))  # used under no_grad only: no detach
        # A Linear on [batch, seq, features] returns a view; an in-place op on a view rewrites its history
        # (the edge above would get no gradient). The layer's users get a copy instead.
        return output.clone() if output._base is not None else None

    def clipped_backward(self, loss_per_sample: torch.Tensor) -> int:
        """Set each parameter's ``.grad`` to the sum over records of their gradients clipped to
        ``max_grad_norm``; return how many records were left out (norm not finite, see the module)."""
        records = self._records
        self.__dict__["_records"] = {}  # plain attributes here and below: nn.Module's __setattr__ costs microseconds a call
        layers, inputs, edges = [], [], []
        for layer in self._layers:
            seen = records.get(layer)
            if seen is None:
                continue
            if len(seen) > 1:
                raise NotImplementedError("Parameter tying is not supported with Ghost Clipping")  # Opacus' rule and words
            layers.append(layer)
            inputs.append(seen[0][0])
            edges.append(seen[0][1])
        # The sum of per-record losses: the gradient reaching each output row is that record's own. Only
        # the layers' output gradients are asked for: autograd skips the (unclipped) parameter gradients.
        stats = _group_norm_stats(layers, edges)  # read before the backward pass frees them
        outputs = torch.autograd.grad(loss_per_sample.sum(), edges, allow_unused=True) if edges else ()
        with torch.no_grad():  # the inputs kept are not detached: nothing below may enter the autograd graph
            out = self._grad_buffer()
            captured = [(layer, a, g) for layer, a, g in zip(layers, inputs, outputs) if g is not None]
            if len(captured) < len(self._layers):
                reached = {id(layer) for layer, _, _ in captured}
                for layer in self._layers:
                    if id(layer) not in reached:  # no gradient reached this layer: every record's gradient here is 0
                        for p in _own(layer):
                            if p.requires_grad:
                                p.grad = torch.zeros_like(p) if out is None else out[p].zero_()
            norms_all, largest, found = all_norms(captured, loss_per_sample.shape[0], loss_per_sample.device, stats)
            all_finite, top = _finite_and_top(norms_all, largest)
            if not all_finite and any(g.dtype != torch.float64 for _, _, g in captured):
                # an overflow in the layers' dtype (inf or NaN, never a wrong finite norm): again, in float64
                captured = [(layer, a.double() if a.is_floating_point() else a, g.double()) for layer, a, g in captured]
                norms_all, largest, found = all_norms(captured, loss_per_sample.shape[0], loss_per_sample.device, stats)
                all_finite, top = _finite_and_top(norms_all, largest)
            self.__dict__["_per_sample_gradient_norms"] = norms_all  # Opacus' per_sample_gradient_norms, set without nn.Module's __setattr__
            finite = None if all_finite else torch.isfinite(norms_all)
            left_out = 0 if finite is None else int((~finite).sum())
            if left_out:
                self.__dict__["nonfinite_records"] = self.nonfinite_records + left_out
            coef = (norms_all + 1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0)  # Opacus' get_clipping_coef: max_grad_norm / (norm + 1e-6), at most 1
            if finite is not None:
                coef = torch.where(finite, coef, torch.zeros_like(coef))
            # float32 is exact enough, and cannot overflow, while every record's entry bound is <= WIDE: then
            # no c_i g_ij a_ik exceeds WIDE, and c_i >= max_grad_norm / (2 WIDE sqrt(layers)) is a normal float
            wide = left_out < len(norms_all) and (top if finite is None else float(largest[finite].max())) > WIDE
            coefs: dict[torch.dtype, torch.Tensor] = {}
            for (layer, activations, backprops), norms in zip(captured, found):
                dtype = torch.float64 if wide else backprops.dtype
                if dtype not in coefs:
                    coefs[dtype] = coef.to(dtype)
                clip_into(layer, activations, backprops, norms, coefs[dtype], finite, out)
            return left_out

    def _grad_buffer(self) -> dict[nn.Parameter, torch.Tensor] | None:
        """Each trainable parameter's place in one buffer for this step's ``.grad`` (in
        ``trainable_parameters`` order), kept as ``grad_buffer``: the optimizer then adds the
        noise to all of them in one pass (:func:`fedmm.privacy.noise.add_noise`). None (and
        a ``.grad`` of its own each) when the parameters differ in dtype or device.

        The last step's buffer, and its views, are used again when nothing holds any of them any
        more (:func:`_unheld`: no ``.grad``, sum or alias of that step is overwritten); else, as on
        the first step, a new one.
        """
        params = self.trainable_parameters
        layout = self.__dict__.get("_buffer_layout")
        if layout is None:
            same = bool(params) and all(p.dtype == params[0].dtype and p.device == params[0].device for p in params)
            layout = self.__dict__["_buffer_layout"] = [p.numel() for p in params] if same else []
        if not layout:
            self.__dict__["grad_buffer"] = None
            return None
        last = self.__dict__.get("_last_views")
        if last is None or not _unheld(*last):
            flat = torch.empty(sum(layout), dtype=params[0].dtype, device=params[0].device)
            views = [part if p.dim() == 1 else part.view(p.shape) for p, part in zip(params, flat.split(layout))]
            last = self.__dict__["_last_views"] = (flat, views, _storage_users(flat), _references(views))  # the counts when nothing else holds them
        self.__dict__["grad_buffer"] = last[0]  # a plain attribute (not a registered buffer)
        return dict(zip(params, last[1]))


class _Recording:
    """What a forward hook on ``layer`` calling ``capture(layer, args, output)`` would do, as the layer's
    own ``forward`` (an instance attribute over the class's): a module with a forward hook takes
    ``nn.Module``'s slow call path, about 10 us a layer and step in the training loop. ``remove()``
    puts back what was there, like a hook's handle."""

    def __init__(self, layer: nn.Module, capture: Any) -> None:
        self.layer, self.previous = layer, layer.__dict__.get("forward")  # an instance forward of its own, kept
        forward = layer.forward

        def recording(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            kept = capture(layer, args, output)
            return output if kept is None else kept

        layer.__dict__["forward"] = recording

    def remove(self) -> None:
        if self.previous is None:
            self.layer.__dict__.pop("forward", None)
        else:
            self.layer.__dict__["forward"] = self.previous


_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private to torch: without it, no buffer is reused


def _storage_users(tensor: torch.Tensor) -> int | None:
    """How many tensors share ``tensor``'s storage (None where torch cannot say: then nothing is reused)."""
    return int(_STORAGE_USE_COUNT(tensor.untyped_storage()._cdata)) if _STORAGE_USE_COUNT is not None else None


def _references(views: list[torch.Tensor]) -> list[tuple[int, int]] | None:
    """Each view's count of Python references and of C++ owners (a ``.grad`` it is, an autograd
    record): a holder of the view itself, not of an alias, shows only here. None where torch cannot say."""
    if not hasattr(torch.Tensor, "_use_count"):
        return None
    return [(sys.getrefcount(view), view._use_count()) for view in views]  # type: ignore[attr-defined]


def _unheld(flat: torch.Tensor, views: list[torch.Tensor], users: int | None, references: list[tuple[int, int]] | None) -> bool:
    """Whether nothing but the module holds ``flat`` or any of its ``views``: no other tensor shares
    its storage and no one else refers to a view (counts as when they were made)."""
    return users is not None and references is not None and _storage_users(flat) == users and _references(views) == references


def _group_norm_stats(layers: list[nn.Module], edges: list[GradientEdge]) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Each GroupNorm's per-record, per-group mean and inverse deviation, as its forward pass saved them
    for its own backward (``native_group_norm``'s two extra results), so that its per-record weight
    gradients need no second normalisation of the input. A layer whose graph node is another (a
    composite GroupNorm) gets none and is normalised again."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, edge in zip(layers, edges):
        if type(layer) is nn.GroupNorm and type(edge.node).__name__ == "NativeGroupNormBackward0":
            node: Any = edge.node  # its saved values are attributes of the generated node class
            mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
            if isinstance(mean, torch.Tensor) and isinstance(rstd, torch.Tensor) and mean.shape == rstd.shape == (node._saved_N, layer.num_groups):
                stats[layer] = (mean.detach(), rstd.detach())
    return stats


def _finite_and_top(norms: torch.Tensor, largest: torch.Tensor) -> tuple[bool, float]:
    """Whether every record's norm is finite, and the largest entry bound (one read of two numbers)."""
    if norms.numel() == 0:
        return True, 0.0
    if largest is norms:  # one reduction: max is NaN or inf where any norm is
        top = float(norms.max())
        return math.isfinite(top), top
    total, top = torch.stack([norms.sum(), largest.max()]).tolist()  # norms >= 0: the sum is finite iff each norm is (or it overflowed)
    return math.isfinite(total) or bool(torch.isfinite(norms).all()), top


def _validate(module: nn.Module, layers: list[nn.Module]) -> None:
    """Opacus' ``ModuleValidator.validate(module, strict=True)`` on the trainable ``layers`` already
    found (the modules it checks), without its walks over the model."""
    errors: list[Exception] = [] if module.training else [IllegalModuleConfigurationError("Model needs to be in training mode")]
    for layer in layers:
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        if validator is not None:
            errors.extend(validator(layer))
    if errors:
        raise UnsupportedModuleError(errors)


class _ClippedLoss(DPTensorFastGradientClipping):
    """Opacus' ghost-clipping loss; its ``backward`` takes one pass on a ``OnePassGradSampleModule``."""

    def detach(self) -> torch.Tensor:
        with torch.no_grad():  # one reduction, no graph (Opacus' reduces, then detaches)
            return self.loss_per_sample.mean() if self.loss_reduction == "mean" else self.loss_per_sample.sum()

    def backward(self) -> None:
        if not isinstance(self.module, OnePassGradSampleModule):
            super().backward()
            return
        # Opacus' two-pass backward zeroes the optimizer's gradients between passes, which also
        # drops its summed gradient unless the last step was skipped; the same here (every
        # ``.grad`` is replaced below). Dropped first: the module may then reuse their buffer.
        if not self.optimizer._is_last_step_skipped:
            for p in self.optimizer.params:
                p.summed_grad = None
        left_out = self.module.clipped_backward(self.loss_per_sample)
        if isinstance(self.optimizer, GhostClippingOptimizer):
            self.optimizer.nonfinite_records += left_out
            self.optimizer.grad_buffer = self.module.grad_buffer  # where the noise can go in one pass, if it still holds every sum


class _ClippingCriterion(DPLossFastGradientClipping):
    def __call__(self, *args: Any, **kwargs: Any) -> DPTensorFastGradientClipping:
        loss = super().__call__(*args, **kwargs)
        loss.__class__ = _ClippedLoss  # same fields; only ``backward`` differs
        return loss


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus' ``PrivacyEngine`` with the faster ghost clipping of this module."""

    def _prepare_model(self, module: nn.Module, **kwargs: Any) -> Any:
        layers = _trainable_layers(module)
        one_pass = (
            kwargs.get("grad_sample_mode") == "ghost"
            and kwargs.get("wrap_model", True)
            and kwargs.get("batch_first", True)
            and not isinstance(module, AbstractGradSampleModule)
            and all(supports(m) for m in layers)
        )
        if not one_pass:
            return super()._prepare_model(module, **kwargs)
        _validate(module, layers)
        return OnePassGradSampleModule(
            module, batch_first=True, loss_reduction=kwargs.get("loss_reduction", "mean"), max_grad_norm=kwargs.get("max_grad_norm", 1.0),
            use_ghost_clipping=True, layers=layers,
        )

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        if type(optimizer) is DPOptimizerFastGradientClipping:
            # Same object and state; only the methods above differ (the subclasses' one new field,
            # nonfinite_records, defaults to 0 on the class).
            optimizer.__class__ = GhostClippingOptimizer
        elif type(optimizer) is DPOptimizer:
            optimizer.__class__ = GradSampleClippingOptimizer
        return optimizer

    def _prepare_criterion(self, **kwargs: Any) -> DPLossFastGradientClipping:
        criterion = super()._prepare_criterion(**kwargs)
        criterion.__class__ = _ClippingCriterion
        return criterion
