"""The base of the model's modules: an nn.Module without its per-call costs.

A decode step makes about seven module calls per layer (~210 for 30 layers). nn.Module's
`__call__` (hook dispatch) and `__getattr__` (children are kept in `_modules`) added ~2 ms
to each step of a 30-layer model with tiny weights on a busy 2-core CPU: time that every
decode step pays whatever its size. These modules install no hooks, so calling one is
calling its forward, and each child is a plain attribute as well (still registered, so
the tree prints and walks as usual).
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Module(nn.Module):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self.__dict__[name] = value  # found by plain attribute lookup, not nn.Module.__getattr__
