"""What the engine asks of a fusion's router: per token and per LoRA layer, a weight for each member.

Routers are built elsewhere (`plait.server.adapters.routers` makes them from fusion records
and adapters); the engine only applies the one a request was submitted with, between the
kernels' shrink and expand (see `plait.server.engine.lora.RoutedRows`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

import torch


class Router(Protocol):
    # What the router is, stably (a fusion's record and member versions): prefix caching salts
    # the request's cached keys and values with it. A router without one is never cached.
    identity: Hashable | None

    def weights(self, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """float32 [tokens, members] weights for the rows of `x` at module `path`, each row summing
        to 1; None where no member adapts that module."""
        ...
