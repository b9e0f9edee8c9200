"""The DARTS architecture step: α follows the validation loss, to first order or through one unrolled weight step.

Second order (Liu et al. 2019, eq. 7-8), computed as the official code computes it:

* ``w' = w - η (momentum · buf + ∇w L_train(w, α) + wd · w)``: the next SGD step, with the weight optimizer's momentum
  buffer (zero for a weight that has none yet);
* ``v = ∇w' L_val(w', α)``, ``∇α L_val(w', α)``;
* ``w± = w ± R v`` with ``R = r / ‖v‖`` (``r = 0.01``), ``hvp = (∇α L_train(w+, α) - ∇α L_train(w-, α)) / 2R``;
* ``∇α = ∇α L_val(w', α) - η · hvp``, applied by Adam(β = (0.5, 0.999), weight decay ``arch_weight_decay``).

The unrolled and perturbed weights are evaluated on the same module, substituted by name for one call (no model copy,
the weights never modified in place). BN running statistics move exactly as in the official code: the passes on the
model's weights (the training batch at ``w``, ``w+`` and ``w-``) update them; the unrolled pass, which the official
code runs on a fresh copy of the model, runs without them (batch statistics, as the copy's training-mode BN uses).
"""

from __future__ import annotations

import torch
from torch import nn


class Architect:
    """Updates ``model.arch_parameters()``; ``model`` provides ``_loss(input, target, state=None)`` (see
    :class:`~swinlab.nas.model_search.SearchNetwork`). ``momentum`` and ``weight_decay`` are the weight optimizer's,
    used to predict its next step."""

    def __init__(
        self,
        model: nn.Module,
        momentum: float,
        weight_decay: float,
        arch_learning_rate: float,
        arch_weight_decay: float,
        r: float = 1e-2,
    ) -> None:
        self.model = model
        self.network_momentum = momentum
        self.network_weight_decay = weight_decay
        self.r = r
        self.optimizer = torch.optim.Adam(
            model.arch_parameters(), lr=arch_learning_rate, betas=(0.5, 0.999), weight_decay=arch_weight_decay
        )

    def step(
        self,
        input_train: torch.Tensor,
        target_train: torch.Tensor,
        input_valid: torch.Tensor,
        target_valid: torch.Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer,
        unrolled: bool,
    ) -> None:
        """One Adam step on α; ``eta`` is the weight learning rate of this step."""
        grads = self.alpha_grads(input_train, target_train, input_valid, target_valid, eta, network_optimizer, unrolled)
        for alpha, g in zip(self.model.arch_parameters(), grads, strict=True):
            alpha.grad = g
        self.optimizer.step()

    def alpha_grads(
        self,
        input_train: torch.Tensor,
        target_train: torch.Tensor,
        input_valid: torch.Tensor,
        target_valid: torch.Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer,
        unrolled: bool,
    ) -> list[torch.Tensor]:
        """The gradient :meth:`step` applies, without applying it."""
        alphas = self.model.arch_parameters()
        if not unrolled:
            return list(torch.autograd.grad(self.model._loss(input_valid, target_valid), alphas))
        names, weights = zip(*self.model.named_parameters(), strict=True)
        unrolled_w = self._unrolled_weights(input_train, target_train, eta, network_optimizer, weights)
        # The official unrolled model is a fresh copy (in training mode): BN normalises by the batch and the model's
        # statistics do not move. A BN without running statistics does both, in either mode.
        stats = {
            f"{name}.{stat}": None
            for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for stat in ("running_mean", "running_var", "num_batches_tracked")
        }
        loss = self.model._loss(input_valid, target_valid, {**dict(zip(names, unrolled_w, strict=True)), **stats})
        grads = torch.autograd.grad(loss, [*alphas, *unrolled_w], materialize_grads=True)
        dalpha, v = grads[: len(alphas)], grads[len(alphas) :]
        hvp = self._hessian_vector_product(names, weights, v, input_train, target_train)
        return [da.sub(h, alpha=eta) for da, h in zip(dalpha, hvp, strict=True)]

    def _unrolled_weights(
        self,
        input_train: torch.Tensor,
        target_train: torch.Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer,
        weights: tuple[torch.Tensor, ...],
    ) -> list[torch.Tensor]:
        grads = torch.autograd.grad(self.model._loss(input_train, target_train), weights, materialize_grads=True)
        # The official element-wise operations in the official order (products and sums, no fused forms), each over
        # the whole list in one call.
        with torch.no_grad():
            steps = torch._foreach_add(grads, torch._foreach_mul(weights, self.network_weight_decay))
            bufs = [network_optimizer.state.get(w, {}).get("momentum_buffer") for w in weights]
            if not any(b is None for b in bufs):
                steps = torch._foreach_add(torch._foreach_mul(bufs, self.network_momentum), steps)
            else:  # a weight without a buffer yet steps without momentum
                steps = [s if b is None else b * self.network_momentum + s for b, s in zip(bufs, steps, strict=True)]
            unrolled = torch._foreach_sub(weights, steps, alpha=eta)
        return [w.requires_grad_() for w in unrolled]

    def _hessian_vector_product(
        self,
        names: tuple[str, ...],
        weights: tuple[torch.Tensor, ...],
        v: tuple[torch.Tensor, ...],
        input_train: torch.Tensor,
        target_train: torch.Tensor,
    ) -> list[torch.Tensor]:
        """∇²_{α,w} L_train(w, α) · v by central differences along ``v``."""
        alphas = self.model.arch_parameters()
        with torch.no_grad():
            R = (self.r / torch.cat([x.reshape(-1) for x in v]).norm()).item()
            w_plus = torch._foreach_add(weights, v, alpha=R)
            w_minus = torch._foreach_sub(w_plus, v, alpha=2 * R)  # from w+, as the official code
        g_plus, g_minus = (
            torch.autograd.grad(
                self.model._loss(input_train, target_train, dict(zip(names, ws, strict=True))),
                alphas,
                materialize_grads=True,
            )
            for ws in (w_plus, w_minus)
        )
        return [(p - m) / (2 * R) for p, m in zip(g_plus, g_minus, strict=True)]
