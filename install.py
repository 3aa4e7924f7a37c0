"""WebUI extension installer (AUTOMATIC1111 / Forge run it at launch and after "Install from URL").

Installs only what the WebUI lacks, through the WebUI's own pip helper (``launch.run_pip``), and never
torch, gradio or transformers: see extension/install_plan.py.
"""

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import launch  # the WebUI's launcher module
except ImportError:  # run by another host (ComfyUI-Manager runs install.py too): nothing to install for it
    print("HG-DPO: install.py is the WebUI extension's installer; nothing to do outside the WebUI.")
    sys.exit(0)

from extension.install_plan import advisories, plan


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


for requirement in plan(launch.is_installed):
    launch.run_pip(f'install "{requirement.spec}"', f"{requirement.spec} for HG-DPO ({requirement.why})")

for message in advisories(_version):
    print(message)
