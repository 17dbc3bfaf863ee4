"""Variational Information Bottleneck masks (Dai et al. 2018, as used by VTrans), independent of any family.

Each unit has a multiplicative mask z = mu + eps * sigma, eps ~ N(0, 1) drawn per example while training.
The KL term to a log-uniform prior, 0.5 * log(1 + mu^2 / sigma^2) per unit, pushes uninformative units to
mu^2 < sigma^2, i.e. log_alpha = log(mu^2 / sigma^2) < 0; a unit is kept while log_alpha > 0, and its mu is
then folded into the weights.
"""
from __future__ import annotations

import torch
from torch import nn

from vtrans.arch.base import unit_counts


class VIBMask(nn.Module):
    def __init__(self, shape: tuple[int, ...], log_alpha_init: float | torch.Tensor = 6.0):
        """mu starts at 1 (the dense model) and sigma^2 at exp(-log_alpha_init): a unit starting at a higher
        log_alpha needs longer to be pruned (warm starts spread units by a one-shot score)."""
        super().__init__()
        self.mu = nn.Parameter(torch.ones(shape))
        self.log_sigma2 = nn.Parameter(-torch.as_tensor(log_alpha_init, dtype=torch.float).expand(shape).clone())

    def log_alpha(self) -> torch.Tensor:
        return torch.log(self.mu.square() + 1e-12) - self.log_sigma2

    def keep(self) -> torch.Tensor:
        """The units kept now: mu^2 > sigma^2."""
        return self.log_alpha() > 0

    def kl(self) -> torch.Tensor:
        return 0.5 * nn.functional.softplus(self.log_alpha()).sum()  # 0.5 * log(1 + alpha)

    def sample(self, batch_size: int) -> torch.Tensor:
        eps = torch.randn(batch_size, *self.mu.shape, device=self.mu.device)
        return self.mu + eps * torch.exp(0.5 * self.log_sigma2)

    def expected_keep(self, temperature: float = 1.0) -> torch.Tensor:
        """A differentiable stand-in for keep(), for the expected cost."""
        return torch.sigmoid(self.log_alpha() / temperature)


class VIBMasks(nn.Module):
    """One VIBMask per mask group (see vtrans.arch.base.MASK_GROUPS)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], log_alpha_init: dict | float = 6.0):
        super().__init__()
        init = log_alpha_init if isinstance(log_alpha_init, dict) else {name: log_alpha_init for name in shapes}
        self.groups = nn.ModuleDict({name: VIBMask(shape, init[name]) for name, shape in shapes.items()})

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {name: m.sample(batch_size) for name, m in self.groups.items()}

    def hidden_keep(self) -> torch.Tensor:
        return self.groups["hidden"].keep().float()

    def kl(self) -> torch.Tensor:
        """Summed over units: the prior's weight per unit does not shrink as models grow."""
        return sum(m.kl() for m in self.groups.values())

    def keep(self) -> dict[str, torch.Tensor]:
        return {name: m.keep() for name, m in self.groups.items()}

    def expected_sizes(self, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Expected kept counts per group, in the form Adapter.cost takes."""
        return unit_counts({name: m.expected_keep(temperature) for name, m in self.groups.items()})
