"""HG-DPO's ComfyUI nodes (V3 schema API, ``comfy_api.v0_0_2``), one module per feature.

* :mod:`.nodes_lora` -- ``HG-DPO LoRA``: the LoRA at weight 0.5 through ComfyUI's own LoRA machinery.
* :mod:`.nodes_lan` -- ``LAN Guider`` (for ``SamplerCustomAdvanced``) and ``LAN KSampler``.
* :mod:`.nodes_pickscore` -- ``PickScore Loader`` and ``PickScore Best-of-N``.

The nodes are thin: the maths lives in the ``hgdpo`` library next to this folder (:mod:`hgdpo.inference.lan`,
:mod:`hgdpo.inference.lockstep_batch`, :mod:`hgdpo.models.lora_runtime`, :mod:`hgdpo.feedback.scorers`,
:mod:`hgdpo.feedback.selection`; how it is found: :mod:`hgdpo_bootstrap`), the
ComfyUI-specific sampling glue in :mod:`.lan_guider`, and every ComfyUI internal any of them touches in
:mod:`.comfy_internals` (with the versions it was checked on). Nothing heavy is imported until ComfyUI asks for the
node list, and each node imports what it needs when it runs.
"""

from __future__ import annotations

import logging

from .. import hgdpo_bootstrap

logger = logging.getLogger(__name__)


def node_list() -> list:
    """The node classes, for ``ComfyExtension.get_node_list``.

    The nodes register even if the library cannot be loaded (a missing dependency, say): each node imports
    what it needs when it runs, so the error is reported on the node that needs it, in the UI.
    """
    try:
        hgdpo_bootstrap.load_package("hgdpo")  # the library next to this folder, unless installed
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
