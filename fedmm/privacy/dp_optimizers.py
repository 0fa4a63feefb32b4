"""fedmm's two DP optimizers: Opacus' own, with the noise of :mod:`fedmm.privacy.noise` and clipping
that cannot overflow (see :mod:`fedmm.privacy.ghost`, whose ``PrivacyEngine`` hands them out).

- ``GhostClippingOptimizer`` (ghost clipping) keeps each clipped sum without a copy when the step
  is taken at once, and adds the noise and divides by the expected batch in one pass (into the
  one-pass module's buffer of all clipped sums when it holds them, see ``grad_buffer``);
- ``GradSampleClippingOptimizer`` (``hooks``, ``functorch``) takes a batch's per-sample norms
  again in float64 when one overflowed float32, and leaves out a record whose norm is still
  not finite.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from torch import nn

from fedmm.privacy.ghost_norms import row_norms, zero_rows
from fedmm.privacy.noise import add_noise

__all__ = ["GhostClippingOptimizer", "GradSampleClippingOptimizer", "WIDE"]

WIDE = 1e30  # a record's |g_i| |a_i| (or norm) above this takes the float64 path: float32 products could overflow


class GhostClippingOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` with cheaper ``accumulate`` and ``add_noise``; its only
    new state is ``nonfinite_records``, the records the one-pass module left out (site-local)."""

    nonfinite_records: int = 0
    grad_buffer: torch.Tensor | None = None  # the one-pass module's buffer holding every clipped sum of this step, if any

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Opacus' default zeroes every ``.grad`` in place; the next backward replaces them all anyway
        # (and the summed gradient is kept or dropped by the parent exactly as before).
        super().zero_grad(set_to_none)

    def accumulate(self, params: list[Any] | None = None) -> None:
        # The parent deep-copies each gradient (copy.deepcopy). A step that is not skipped adds the
        # noise to its sum at once and then replaces ``.grad``, so that sum can share ``.grad``'s
        # storage; a skipped step (one physical batch of several) keeps a copy, as ``.grad`` may be
        # zeroed in place before the next batch.
        copy = self._check_skip_next_step(pop_next=False)
        todo: list[Any] = self.params if params is None else params  # Opacus' own attributes on each parameter
        for p in todo:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad.detach().clone() if copy else p.grad.detach()

    def pre_step(self, closure: Any = None) -> bool:
        params = self.params
        if self.secure_mode or not params:
            return bool(super().pre_step(closure))  # Opacus' secure mode (torchcsprng) keeps its own noise
        self.accumulate(params)
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self._noise_and_scale(params)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _noise_and_scale(self, params: list[nn.Parameter], *, divide: bool = True) -> None:
        """``add_noise`` and ``scale_grad`` of the parent in one pass: each ``.grad`` becomes
        ``(summed_grad + N(0, (noise_multiplier * max_grad_norm)^2)) / batch``, the noise from
        :func:`fedmm.privacy.noise.add_noise` (a secure stream whose tails are not cut at 5.8 sigma)."""
        scale = 1.0 / (self.expected_batch_size * self.accumulated_iterations) if divide and self.loss_reduction == "mean" else 1.0
        add_noise(self, scale=scale)

    def add_noise(self) -> None:  # the parent's API; ``pre_step`` above adds the noise and divides at once
        if self.secure_mode:
            super().add_noise()
            return
        self._noise_and_scale(self.params, divide=False)


class GradSampleClippingOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (``hooks``, ``functorch``) whose per-sample clipping cannot overflow.

    Opacus takes each record's norm in float32, where a gradient entry of 1e19 already
    overflows (inf, then ``0 * inf``); here a batch whose float32 norms are not all finite
    has them taken again in float64, a record whose norm is still not finite is zeroed and
    counted in ``nonfinite_records`` (never sent), and the clipped sum is float64 when a norm
    exceeds ``WIDE``. Otherwise (every common batch) the same arithmetic as the parent.
    """

    nonfinite_records: int = 0

    def clip_and_accumulate(self) -> None:
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:
            super().clip_and_accumulate()  # an empty batch: nothing to clip
            return
        # Opacus' float32 norms (a float64 reduction of these tensors is several times slower); a norm
        # that overflowed (inf: entries beyond ~1e19) or is NaN is taken again in float64
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1).double()
        if not bool(torch.isfinite(norms).all()):
            norms = torch.stack([row_norms(g) for g in grad_samples], dim=1).norm(2, dim=1)
        finite = torch.isfinite(norms)
        left_out = int((~finite).sum())
        self.nonfinite_records += left_out
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping factor
        if left_out:
            coef = torch.where(finite, coef, torch.zeros_like(coef))
        wide = left_out < len(norms) and float((norms[finite] if left_out else norms).max()) > WIDE
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            if left_out:
                grad_sample = zero_rows(grad_sample, finite)
            dtype = torch.float64 if wide else p.dtype
            grad = torch.einsum("i,i...", coef.to(device=grad_sample.device, dtype=dtype), grad_sample.to(dtype)).to(p.dtype)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        if self.secure_mode:
            super().add_noise()
            return
        add_noise(self, scale=1.0)  # the secure, untruncated noise of fedmm.privacy.noise; the parent's scale_grad divides
