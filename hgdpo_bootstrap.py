"""How the hosts find the library: the one place that says it (README, "How the hosts find the library").

The library is the plain package ``hgdpo/`` of this checkout. What imports it, and how it finds it:

* **an install** (``pip install -e .``, or a wheel): ``import hgdpo`` just works; nothing below is needed.
* **pytest** (``tests/``): ``pythonpath = ["."]`` in ``pyproject.toml`` puts the checkout first.
* **this checkout's scripts run by path** (``trainer/*.py``, ``bench/*.py``, ``install.py``): Python puts the
  script's own folder on ``sys.path``, not the checkout, so each has one header line,
  ``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))`` (the checkout root; ``parent`` for
  ``install.py``), before its first ``hgdpo`` import. Nothing can be imported before that line has run, so
  it is a line, not an import of this module.
* **the host applications**: ComfyUI imports this folder as a custom node pack (``__init__.py`` ->
  ``nodes/``), the WebUI runs ``scripts/hgdpo_webui.py``. Both call :func:`load_package`, which loads
  ``hgdpo/`` (and, for the WebUI, ``extension/`` under the private name ``hgdpo_webui_extension``) from this
  checkout *without* putting the checkout on ``sys.path``: ComfyUI has its own top-level ``nodes`` and
  ``tests``, the WebUI its own ``scripts`` and ``modules``, which this checkout's folders must not shadow.
  A package of that name that is already imported (an editable install, say) is used as it is.
* **a test runner importing the checkout folder as package "hgdpo"** (pytest does, since ``tests/`` and the
  root have an ``__init__.py``, when the repository is cloned into a folder named ``hgdpo``): the root
  ``__init__.py`` then puts ``hgdpo/`` first on its own ``__path__``, so ``hgdpo.models`` & co. are the
  library's modules (``hgdpo.tests`` stays the runner's; the library's own ``__init__``, a docstring and
  ``__version__``, is not run then).

This module imports only the standard library, so a host can load it by path before anything else.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent
"""The checkout."""


def load_package(name: str, folder: Path = ROOT / "hgdpo") -> ModuleType:
    """The package ``name`` from ``folder`` of this checkout (the library by default), imported once.

    An already imported ``name`` is returned as it is; a package that fails to import leaves no trace in
    ``sys.modules``.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
