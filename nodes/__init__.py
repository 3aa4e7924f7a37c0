"""HG-DPO's ComfyUI nodes (V3 schema API, ``comfy_api.v0_0_2``), one module per feature.

* :mod:`.nodes_lora` -- ``HG-DPO LoRA``: the LoRA at weight 0.5 through ComfyUI's own LoRA machinery.
* :mod:`.nodes_lan` -- ``LAN Guider`` (for ``SamplerCustomAdvanced``) and ``LAN KSampler``.
* :mod:`.nodes_pickscore` -- ``PickScore Loader`` and ``PickScore Best-of-N``.

The nodes are thin: the maths lives in the ``hgdpo`` library next to this folder (:mod:`hgdpo.inference.lan`,
:mod:`hgdpo.inference.lockstep_batch`, :mod:`hgdpo.models.lora_runtime`, :mod:`hgdpo.feedback.scorers`, :mod:`hgdpo.data.selection`), the
ComfyUI-specific sampling glue in :mod:`.lan_guider`, and every ComfyUI internal any of them touches in
:mod:`.comfy_internals` (with the versions it was checked on). Nothing heavy is imported until ComfyUI asks for the
node list, and each node imports what it needs when it runs.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
BUNDLED_LIBRARY = Path(__file__).resolve().parent.parent / "hgdpo"


def ensure_library():
    """Make ``import hgdpo`` work inside ComfyUI without installing anything.

    The pack ships the library in its own folder; it is loaded from there (without putting the pack folder
    on ``sys.path``, which would expose ``tests``, ``nodes``... as top-level modules). An ``hgdpo`` that is
    already imported (an editable install of this repository, say) is used as it is.
    """
    if "hgdpo" in sys.modules:
        return sys.modules["hgdpo"]
    spec = importlib.util.spec_from_file_location(
        "hgdpo", BUNDLED_LIBRARY / "__init__.py", submodule_search_locations=[str(BUNDLED_LIBRARY)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["hgdpo"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["hgdpo"]
        raise
    return module


def node_list() -> list:
    """The node classes, for ``ComfyExtension.get_node_list``.

    The nodes register even if the library cannot be loaded (a missing dependency, say): each node imports
    what it needs when it runs, so the error is reported on the node that needs it, in the UI.
    """
    try:
        ensure_library()
    except Exception as error:  # noqa: BLE001 - reported when a node runs
        logger.warning("HG-DPO: the hgdpo library could not be loaded (%s); the HG-DPO nodes will report it "
                       "when used.", error)
    from .comfy_internals import comfyui_version, missing_internals

    missing = missing_internals()
    if missing:
        logger.warning("HG-DPO: ComfyUI %s lacks %s; the HG-DPO nodes that need them will say so when run.",
                       comfyui_version(), ", ".join(missing))
    from .nodes_lan import LANGuiderNode, LANKSampler
    from .nodes_lora import HGDPOLoraLoader
    from .nodes_pickscore import PickScoreBestOfN, PickScoreLoader

    return [HGDPOLoraLoader, LANGuiderNode, LANKSampler, PickScoreLoader, PickScoreBestOfN]
