"""The extension's API route behind the WebUI's own ``--api-auth``, in a real WebUI.

A separate module from ``test_webui_integration.py`` so that its WebUI (started with ``--api-auth``) runs
alone (one WebUI in memory at a time). Skipped, with the reason, when no WebUI is configured.
"""

from __future__ import annotations

import pytest

from extension.webui_harness import WebUI, WebUIClient
from tests.test_webui_integration import CONFIG, LORA, SKIP_REASON, make_data_dir

pytestmark = pytest.mark.skipif(CONFIG is None, reason=SKIP_REASON)

CREDENTIALS = ("hgdpo", "s3cret-for-the-test")


def test_status_route_needs_the_api_credentials(tmp_path_factory):
    with WebUI(CONFIG, make_data_dir(tmp_path_factory), api_auth=CREDENTIALS) as webui:
        for path in ("/sdapi/v1/samplers", "/hgdpo/v1/status"):  # the WebUI's own route, then ours
            status, _ = webui.request("GET", path, auth=False)
            assert status == 401, path
        assert WebUIClient(webui.url, (CREDENTIALS[0], "wrong")).request("GET", "/hgdpo/v1/status")[0] == 401
        status, payload = webui.request("GET", "/hgdpo/v1/status")
        assert status == 200 and LORA in {item["name"] for item in payload["loras"]}
