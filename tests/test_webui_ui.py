"""The extension in a real WebUI's gradio UI: the accordion, and infotext read back through the paste fields.

A separate module from ``test_webui_integration.py`` so that its API-only WebUI is stopped before this
one starts (one WebUI in memory at a time). Skipped, with the reason, when no WebUI is configured.
"""

from __future__ import annotations

import pytest

from extension.webui_harness import WebUI
from hgdpo.inference.infotext import LAN_KEY, LORA_HASH_KEY, LORA_KEY, WEIGHT_KEY
from tests.test_webui_integration import (
    CONFIG,
    FORGE_API_FIELDS,
    LORA,
    SAME,
    SKIP_REASON,
    images,
    infotexts,
    make_data_dir,
    max_diff,
    params,
    txt2img,
)

pytestmark = pytest.mark.skipif(CONFIG is None, reason=SKIP_REASON)


def test_accordion_in_the_ui_and_infotext_paste(tmp_path_factory):
    with WebUI(CONFIG, make_data_dir(tmp_path_factory), ui=True) as webui:
        config = webui.get("/config")
        props = {component["props"].get("elem_id"): component["props"] for component in config["components"]
                 if component.get("props", {}).get("elem_id")}
        assert props["script_txt2img_hgdpo_weight"]["value"] == 0.5
        assert props["script_img2img_hgdpo_weight"]["label"] == "HG-DPO LoRA weight"
        assert LORA in [choice if isinstance(choice, str) else choice[0]
                        for choice in props["script_txt2img_hgdpo_lora"]["choices"]]
        first = txt2img(webui, "DPM++ 2M (HG-DPO LAN)", [LORA, 0.35, 0.6])
        # the API's `infotext` goes through the same paste fields as "send to txt2img" / PNG Info
        status, again = webui.post("/sdapi/v1/txt2img", {"infotext": infotexts(first)[0], **FORGE_API_FIELDS})
        assert status == 200, again
        original, pasted = params(infotexts(first)[0]), params(infotexts(again)[0])
        for key in ("Sampler", LORA_KEY, LORA_HASH_KEY, WEIGHT_KEY, LAN_KEY, "Seed"):
            assert pasted[key] == original[key], key
        assert max_diff(images(again)[0], images(first)[0]) <= SAME
