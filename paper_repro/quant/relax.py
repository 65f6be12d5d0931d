"""BinaryRelax (BR) and BinaryConnect (BC) as weight-swap contexts.

The optimizer owns the float weights W. For each minibatch the selected parameters temporarily
hold U instead (paper-spec section 4):
    phase 1 (BR, epoch < hard_epoch):  U = (eta * Q(W) + W) / (1 + eta)
    phase 2 (BR from hard_epoch, BC from the start):  U = Q(W)
Forward and backward (and the training-time attack) run on U; on leaving the context W is copied
back while ``param.grad`` keeps dL/dU, so ``optimizer.step()`` applies momentum and weight decay to
W. The deployed model is exactly Q(W). eta starts at eta0 and is multiplied by rho after each
epoch, so epoch e of phase 1 uses eta0 * rho^e.

No quantization (``scheme=None`` or ``"none"``) is the same class with no selected tensors:
method becomes "none", both contexts are no-ops, every epoch is phase 2 (U = W = deployed) and
selectable, so the training loop has a single code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .quantizers import Rule, check_scheme, is_none, project, select_quantized

METHODS = ("BR", "BC", "none")
_STATE_VERSION = 1


class BinaryRelax:
    """Swaps relaxed (U) or deployed (Q(W)) weights into a model and keeps the eta schedule."""

    def __init__(
        self,
        model: nn.Module,
        scheme: str | None,
        method: str = "BR",
        eta0: float = 1.0,
        rho: float = 1.05,
        hard_epoch: int = 120,
        names: list[str] | Rule | None = None,
        **opts: Any,
    ) -> None:
        self.opts = check_scheme(scheme, **opts)
        self.scheme = None if is_none(scheme) else scheme
        if self.scheme is None:
            method = "none"
        elif method not in ("BR", "BC"):
            raise ValueError(f"method must be 'BR' or 'BC' for scheme {scheme!r}, got {method!r}")
        if eta0 <= 0 or rho < 1 or hard_epoch < 0:
            raise ValueError(f"need eta0 > 0, rho >= 1, hard_epoch >= 0; got {eta0}, {rho}, {hard_epoch}")
        self.model = model
        self.method = method
        self.eta0, self.rho, self.hard_epoch = float(eta0), float(rho), int(hard_epoch)
        self.eta = self.eta0
        self.epoch = 0  # the epoch being trained; advanced by end_epoch
        self.names = self._resolve_names(names)
        self._saved: dict[str, Tensor] = {}  # persistent W buffers, one per selected parameter
        self._swapped = False

    # ----- selection -----------------------------------------------------------------------
    def _resolve_names(self, names: list[str] | Rule | None) -> list[str]:
        if self.scheme is None:
            return []
        if names is None or callable(names):
            return select_quantized(self.model, names)
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"not parameters of the model: {missing}")
        return list(names)

    @property
    def quantized(self) -> bool:
        """False for full-precision runs."""
        return self.scheme is not None

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        params = dict(self.model.named_parameters())
        return [(n, params[n]) for n in self.names]

    # ----- schedule --------------------------------------------------------------------------
    def phase(self, epoch: int | None = None) -> int:
        """1 while U is a relaxation (BR before hard_epoch), else 2 (U = Q(W); always for BC/none)."""
        epoch = self.epoch if epoch is None else epoch
        return 1 if self.method == "BR" and epoch < self.hard_epoch else 2

    def selectable(self, epoch: int | None = None) -> bool:
        """May this epoch's model be chosen as the best checkpoint? Quantized runs: phase 2 only."""
        return not self.quantized or self.phase(epoch) == 2

    def end_epoch(self, epoch: int | None = None) -> None:
        """Call once after each training epoch: eta *= rho while the next epoch is still phase 1."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self.epoch:
            raise ValueError(f"end_epoch({epoch}) but the schedule is at epoch {self.epoch}")
        if self.method == "BR" and epoch + 1 < self.hard_epoch:
            self.eta *= self.rho
        self.epoch = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """Schedule state (JSON-serialisable; floats round-trip exactly through JSON)."""
        return {
            "version": _STATE_VERSION, "scheme": self.scheme, "opts": dict(self.opts), "method": self.method,
            "eta0": self.eta0, "rho": self.rho, "hard_epoch": self.hard_epoch,
            "eta": self.eta, "epoch": self.epoch, "names": list(self.names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore eta and epoch; refuses a state from a different configuration."""
        for key in ("scheme", "opts", "method", "eta0", "rho", "hard_epoch", "names"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"BinaryRelax state mismatch on {key!r}: {state[key]!r} != {self.state_dict()[key]!r}")
        self.eta = float(state["eta"])
        self.epoch = int(state["epoch"])

    # ----- weights ---------------------------------------------------------------------------
    def quantize(self, w: Tensor) -> Tensor:
        """Q(w) with this run's scheme and options."""
        return project(w, self.scheme, **self.opts)

    def relaxed_weight(self, w: Tensor) -> Tensor:
        """U for one float tensor W at the current epoch and eta (a new tensor)."""
        u = self.quantize(w)
        if self.phase() == 1:
            u.mul_(self.eta).add_(w).div_(1.0 + self.eta)
        return u

    @contextlib.contextmanager
    def _swap(self, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
        if self._swapped:
            raise RuntimeError("BinaryRelax contexts do not nest")
        params = self._params()
        done: list[tuple[nn.Parameter, Tensor]] = []
        self._swapped = True
        try:
            with torch.no_grad():
                for name, p in params:
                    buf = self._saved.get(name)
                    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        buf = self._saved[name] = torch.empty_like(p, memory_format=torch.preserve_format)
                    buf.copy_(p)
                    done.append((p, buf))
                    p.copy_(make(buf))
            yield
        finally:
            with torch.no_grad():
                for p, buf in done:
                    p.copy_(buf)
            self._swapped = False

    def relaxed(self) -> contextlib.AbstractContextManager[None]:
        """Context holding U (current epoch and eta) in the selected parameters.

        Run the attack, forward and backward inside; call optimizer.step() after leaving it.
        """
        return self._swap(self.relaxed_weight)

    def deployed(self) -> contextlib.AbstractContextManager[None]:
        """Context holding Q(W) (the deployed model) in the selected parameters: evaluate inside."""
        return self._swap(self.quantize)

    def deployed_tensors(self) -> dict[str, Tensor]:
        """The deployed model's full state dict (copies): Q(W) for selected parameters, rest as is."""
        if self._swapped:
            raise RuntimeError("deployed_tensors() inside a swap context")
        chosen = set(self.names)
        out: dict[str, Tensor] = {}
        for name, t in self.model.state_dict().items():
            out[name] = self.quantize(t) if name in chosen else t.detach().clone()
        return out
