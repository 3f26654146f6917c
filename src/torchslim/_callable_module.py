"""Let ``ts.measure(...)`` and ``ts.train(...)`` work although ``measure``/``train`` are also modules.

Importing the submodule ``torchslim.measure`` rebinds the package attribute ``measure`` to the
module, which would shadow the function of the same name. Making the module itself callable
(forwarding to the function) keeps the documented API working in every import order.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_module_callable(module_name: str, function_name: str) -> None:
    """Make ``sys.modules[module_name]`` callable as its function ``function_name``.

    Args:
        module_name: the module to change (normally ``__name__`` of the caller).
        function_name: the attribute that calls are forwarded to.
    """
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            function: Callable[..., Any] = getattr(self, function_name)
            return function(*args, **kwargs)

    module.__class__ = _CallableModule
