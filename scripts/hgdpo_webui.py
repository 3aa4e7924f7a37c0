"""HG-DPO for the Stable Diffusion WebUI (AUTOMATIC1111 1.10, Forge): LAN samplers, LoRA weight, best-of-N.

The WebUI imports every ``scripts/*.py`` of an extension; this file only loads the logic: the WebUI glue
in ``extension/`` (imported under a private package name, so no other extension's ``extension`` module
can clash with it) and the shared core in ``hgdpo/``.
"""

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]

if "hgdpo_bootstrap" not in sys.modules:  # how the hosts find the library: hgdpo_bootstrap.py
    _spec = importlib.util.spec_from_file_location("hgdpo_bootstrap", _ROOT / "hgdpo_bootstrap.py")
    sys.modules["hgdpo_bootstrap"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["hgdpo_bootstrap"])
sys.modules["hgdpo_bootstrap"].load_package("hgdpo")
sys.modules["hgdpo_bootstrap"].load_package("hgdpo_webui_extension", _ROOT / "extension")

from hgdpo_webui_extension import webui_script
from hgdpo_webui_extension.webui_script import HGDPOScript  # noqa: F401  (the WebUI finds the Script here)

webui_script.register_callbacks()
