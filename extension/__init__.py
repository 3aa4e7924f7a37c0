"""HG-DPO extension for the Stable Diffusion WebUI (AUTOMATIC1111 1.10 and Forge).

The WebUI imports only ``scripts/*.py`` at the repository root; those files are thin and load this
package. Its modules come in two kinds:

* framework-free (no ``modules.*``, no gradio), unit-tested in CI: :mod:`.settings` (the accordion's
  values, their checks, infotext and X/Y/Z handling), :mod:`.webui_lockstep` (the SFT/DPO lockstep batch with
  latent adaptive normalization), :mod:`.lora_files` (the HG-DPO LoRA files of the WebUI's Lora folder),
  :mod:`.best_of` (best-of-N with PickScore), :mod:`.install_plan` (what ``install.py`` installs);
* WebUI glue, importable only inside a running WebUI: :mod:`.webui_backend` (A1111 or Forge: where the
  UNet and the text encoder are), :mod:`.webui_samplers` (the LAN samplers), :mod:`.webui_script` (the
  accordion script, settings, X/Y/Z axes, API route).

The math (LAN, the functional LoRA, the scorers, the infotext keys) lives in :mod:`hgdpo`, shared with
the command line and the other frontends.
"""
