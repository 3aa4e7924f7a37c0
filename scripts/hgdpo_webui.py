"""HG-DPO for the Stable Diffusion WebUI (AUTOMATIC1111 1.10, Forge): LAN samplers, LoRA weight, best-of-N.

The WebUI imports every ``scripts/*.py`` of an extension; this file only loads the logic: the WebUI glue
in ``extension/`` (imported under a private package name, so no other extension's ``extension`` module
can clash with it) and the shared core in ``hgdpo/``.
"""

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGE = "hgdpo_webui_extension"

if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))  # `import hgdpo`: the core library next to this folder (not pip-installed)

if _PACKAGE not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _PACKAGE, _ROOT / "extension" / "__init__.py", submodule_search_locations=[str(_ROOT / "extension")]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_PACKAGE] = _module
    _spec.loader.exec_module(_module)

from hgdpo_webui_extension import webui_script
from hgdpo_webui_extension.webui_script import HGDPOScript  # noqa: F401  (the WebUI finds the Script here)

webui_script.register_callbacks()
