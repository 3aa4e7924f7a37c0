"""HG-DPO as a ComfyUI custom node pack: clone this repository into ``ComfyUI/custom_nodes/``.

ComfyUI imports this file and calls :func:`comfy_entrypoint` (the V3 node API, pinned to the numbered
API version ``comfy_api.v0_0_2``; ``nodes/comfy_internals.py`` says why). Nothing is imported at module
level, so importing the pack costs nothing at ComfyUI's start, and test runners that import the
repository root as a package need no ComfyUI. The nodes live in ``nodes/``, the library they use in ``hgdpo/``
(found as :mod:`hgdpo_bootstrap` says).
"""

if __name__ == "hgdpo":  # pragma: no cover - a runner imported a checkout folder named "hgdpo" (hgdpo_bootstrap.py)
    import os as _os

    __path__.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "hgdpo"))  # hgdpo.* = the library


async def comfy_entrypoint():
    """The pack's ``ComfyExtension`` (called by ComfyUI's custom node loader)."""
    from .nodes import node_list
    from .nodes.comfy_internals import ComfyExtension

    class HGDPOExtension(ComfyExtension):
        async def get_node_list(self):
            return node_list()

    return HGDPOExtension()
