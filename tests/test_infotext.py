"""Generation parameters in the WebUI's ``parameters`` format: written, read back, stored in PNGs."""

from PIL import Image

from hgdpo.inference.infotext import format_parameters, parse_parameters, read_png_parameters, save_png


def test_round_trip_with_commas_colons_quotes_and_multiline_prompts():
    fields = {"Steps": 50, "Sampler": "DPM++ 2M", "CFG scale": 5.0, "Seed": 7, "HG-DPO LoRA": 'my, "best": lora',
              "Model hash": None, "HG-DPO weight": 0.5}
    text = format_parameters("a woman, singing\non the stage", "blurry, extra fingers\nlow quality", fields)
    assert "Model hash" not in text  # None values are left out
    assert 'HG-DPO LoRA: "my, \\"best\\": lora"' in text  # quoted as the WebUI quotes
    prompt, negative, parsed = parse_parameters(text)
    assert prompt == "a woman, singing\non the stage"
    assert negative == "blurry, extra fingers\nlow quality"
    assert parsed == {"Steps": "50", "Sampler": "DPM++ 2M", "CFG scale": "5.0", "Seed": "7",
                      "HG-DPO LoRA": 'my, "best": lora', "HG-DPO weight": "0.5"}


def test_a_prompt_with_colons_is_not_taken_for_the_field_line():
    assert parse_parameters("portrait: a woman, style: photo") == ("portrait: a woman, style: photo", "", {})


def test_png_text_chunk(tmp_path):
    text = format_parameters("a man", "", {"Steps": 2, "Seed": 1, "Size": "64x64"})
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "x.png", text)
    assert read_png_parameters(path) == text
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # written atomically, no temporary left
