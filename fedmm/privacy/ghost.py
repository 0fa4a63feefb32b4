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
- ``GhostClippingOptimizer`` (Opacus' ``DPOptimizerFastGradientClipping``) copies each
  summed gradient with ``clone`` instead of ``copy.deepcopy`` and draws the Gaussian
  noise for all parameters in one call instead of one call per tensor; the noise is
  the same i.i.d. N(0, (noise_multiplier * max_grad_norm)^2) per coordinate (a different
  random stream from the parent's, so a seeded run does not repeat its exact noise).
- a model whose every trainable layer is an ``nn.Linear`` (the default AV-MNIST model)
  gets ``OnePassGradSampleModule``: ghost clipping in one backward pass instead of
  Opacus' two. A forward hook keeps each Linear's input ``a_i`` and a tensor hook its
  output gradient ``g_i`` (a tensor hook, not a module backward hook: far less Python
  per step, and it sees the gradient of the output before any in-place op that follows).
  One backward of the summed per-record losses gives every ``g_i``; the per-record norms
  follow as above, and the clipped sum ``sum_i c_i g_i a_i^T`` is one matrix product per
  layer, so the second backward pass Opacus takes to apply ``c_i`` is not needed (the
  "book-keeping" idea of Bu et al., "Differentially private optimization on large model at
  small cost", ICML 2023). Every other model keeps Opacus' own two-pass module;
- ``PrivacyEngine`` is Opacus' engine that hands out that optimizer, that module and the
  matching loss wrapper for ghost clipping.

``tests/test_model_dp.py`` checks the result against per-sample clipped gradients
computed without Opacus, and the noise's standard deviation.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import opacus
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from torch import nn

__all__ = ["GhostClippingOptimizer", "OnePassGradSampleModule", "PrivacyEngine", "linear_norm_sample"]


@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norms of ``layer`` (Opacus' ghost norm sampler, faster for 2-D inputs).

    Sample i's weight gradient is the outer product ``g_i a_i^T``, whose norm is ``|g_i| |a_i|``.
    """
    if backprops.dim() != 2:
        return compute_linear_norm_sample(layer, activations, backprops)
    grad_sq = backprops.square().sum(dim=1)
    norms: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = torch.sqrt(grad_sq * activations[0].to(backprops.dtype).square().sum(dim=1))
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = torch.sqrt(grad_sq)
    return norms


class GhostClippingOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` with cheaper ``accumulate`` and ``add_noise`` (no new state)."""

    def accumulate(self) -> None:
        # The parent deep-copies each gradient (copy.deepcopy), about 10x slower than clone.
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone()

    def add_noise(self) -> None:
        params = self.params
        if self.secure_mode or len({(p.dtype, p.device) for p in params}) != 1:
            super().add_noise()  # secure noise is built differently; mixed tensors cannot share one draw
            return
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        sizes = [p.numel() for p in params]
        # One draw for every coordinate of every parameter, split per tensor: the same
        # distribution as the parent's draw per tensor, issued once.
        noise = torch.normal(0.0, std, size=(sum(sizes),), generator=self.generator, dtype=params[0].dtype, device=params[0].device)
        for p, n in zip(params, noise.split(sizes)):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + n.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def _keep_gradient(record: list[Any], grad: torch.Tensor) -> None:
    record[1] = grad.detach()


class OnePassGradSampleModule(GradSampleModuleFastGradientClipping):
    """Opacus' ghost-clipping module for models whose every trainable layer is an ``nn.Linear``,
    clipping in one backward pass (:meth:`clipped_backward`) instead of two.

    Everything else (validation, wrapping, ``_close``) is Opacus' own.
    """

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        layers = [m for _, m in trainable_modules(self._module)]
        if not batch_first or any(type(m) is not nn.Linear for m in layers):
            raise TypeError("OnePassGradSampleModule takes batch-first models whose trainable layers are all nn.Linear")
        handles = self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = handles
        self._layers: list[nn.Linear] = layers
        self._records: dict[nn.Module, list[list[Any]]] = {}  # layer -> [[input, output gradient or None]]
        handles.extend(layer.register_forward_hook(self._capture) for layer in layers)
        self.enable_hooks()

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not (self.hooks_enabled and layer.training and torch.is_grad_enabled() and output.requires_grad):
            return None
        record = [inputs[0].detach(), None]  # [input, gradient of the output], the latter set in backward
        self._records.setdefault(layer, []).append(record)
        output.register_hook(partial(_keep_gradient, record))
        # A Linear on [batch, seq, features] returns a view; an in-place op on a view (ReLU(inplace=True))
        # rewrites its history and the hook never fires. The layer's users get a copy instead.
        return output.clone() if output._base is not None else None

    def clipped_backward(self, loss_per_sample: torch.Tensor) -> None:
        """Set each parameter's ``.grad`` to the sum over records of their gradients clipped to ``max_grad_norm``."""
        # The sum of per-record losses: the gradient reaching each output row is that record's own.
        loss_per_sample.sum().backward()
        records, self._records = self._records, {}
        squared = loss_per_sample.new_zeros(loss_per_sample.shape[0]).detach()
        captured: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        for layer in self._layers:
            seen = records.get(layer, [])
            if len(seen) > 1:
                raise NotImplementedError("Parameter tying is not supported with Ghost Clipping")  # Opacus' rule and words
            if not seen or seen[0][1] is None:
                # no gradient reached this layer: every record's gradient here is 0
                for p in layer.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                continue
            activations, backprops = seen[0]
            captured.append((layer, activations, backprops))
            if backprops.dim() == 2:
                grad_sq = backprops.square().sum(dim=1)
                if layer.weight.requires_grad:
                    squared += grad_sq * activations.to(backprops).square().sum(dim=1)
                if layer.bias is not None and layer.bias.requires_grad:
                    squared += grad_sq
            else:
                for norm in compute_linear_norm_sample(layer, [activations], backprops).values():
                    squared += norm.square()
        norms = squared.sqrt()
        self.per_sample_gradient_norms = norms
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' get_clipping_coef
        for layer, activations, backprops in captured:
            scaled = (backprops * coef.view(-1, *[1] * (backprops.dim() - 1))).reshape(-1, backprops.shape[-1])
            if layer.weight.requires_grad:
                layer.weight.grad = (scaled.t() @ activations.reshape(-1, activations.shape[-1]).to(scaled)).to(layer.weight.dtype)
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = scaled.sum(dim=0).to(layer.bias.dtype)


class _ClippedLoss(DPTensorFastGradientClipping):
    """Opacus' ghost-clipping loss; its ``backward`` takes one pass on a ``OnePassGradSampleModule``."""

    def backward(self) -> None:
        if not isinstance(self.module, OnePassGradSampleModule):
            super().backward()
            return
        self.module.clipped_backward(self.loss_per_sample)
        # Opacus' two-pass backward zeroes the optimizer's gradients between passes, which also
        # drops its summed gradient unless the last step was skipped; the same here (every
        # ``.grad`` was just replaced).
        if not self.optimizer._is_last_step_skipped:
            for p in self.optimizer.params:
                p.summed_grad = None


class _ClippingCriterion(DPLossFastGradientClipping):
    def __call__(self, *args: Any, **kwargs: Any) -> DPTensorFastGradientClipping:
        loss = super().__call__(*args, **kwargs)
        loss.__class__ = _ClippedLoss  # same fields; only ``backward`` differs
        return loss


class PrivacyEngine(opacus.PrivacyEngine):
    """Opacus' ``PrivacyEngine`` with the faster ghost clipping of this module."""

    def _prepare_model(self, module: nn.Module, **kwargs: Any) -> Any:
        one_pass = (
            kwargs.get("grad_sample_mode") == "ghost"
            and kwargs.get("wrap_model", True)
            and kwargs.get("batch_first", True)
            and not isinstance(module, AbstractGradSampleModule)
            and all(type(m) is nn.Linear for _, m in trainable_modules(module))
        )
        if not one_pass:
            return super()._prepare_model(module, **kwargs)
        self.validate(module=module, optimizer=None, data_loader=None)
        return OnePassGradSampleModule(module, batch_first=True, loss_reduction=kwargs.get("loss_reduction", "mean"), max_grad_norm=kwargs.get("max_grad_norm", 1.0), use_ghost_clipping=True)

    def _prepare_optimizer(self, **kwargs: Any) -> DPOptimizer:
        optimizer = super()._prepare_optimizer(**kwargs)
        if type(optimizer) is DPOptimizerFastGradientClipping:
            # Same object and state; only the two methods above differ (the subclass adds no fields).
            optimizer.__class__ = GhostClippingOptimizer
        return optimizer

    def _prepare_criterion(self, **kwargs: Any) -> DPLossFastGradientClipping:
        criterion = super()._prepare_criterion(**kwargs)
        criterion.__class__ = _ClippingCriterion
        return criterion
