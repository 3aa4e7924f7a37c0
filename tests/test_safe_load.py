"""Pickled files are read only where ``torch.load(weights_only=True)`` is safe (torch >= 2.6)."""

from __future__ import annotations

import os

import pytest
import torch

from hgdpo import safe_load
from hgdpo.feedback import metrics
from hgdpo.models import loading as models


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture
def tensor_file(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    return path


@pytest.mark.parametrize(
    ("text", "expected"), [("2.5.1+cu121", (2, 5)), ("2.14.1", (2, 14)), ("2.6.0a0+git", (2, 6)), ("3.0rc1", (3, 0))]
)
def test_version_parsing(monkeypatch, text, expected):
    monkeypatch.setattr(torch, "__version__", text)
    assert safe_load.torch_version() == expected


def test_reads_tensors_on_a_safe_torch(tensor_file):
    assert torch.equal(models.read_state_dict(tensor_file)["w"], torch.arange(4.0))
    assert torch.equal(metrics._load_state_dict(tensor_file)["w"], torch.arange(4.0))


def test_refuses_code_in_a_pickle(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": _RunsCode()}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        models.read_state_dict(path)


@pytest.mark.parametrize("reader", [models.read_state_dict, metrics._load_state_dict, safe_load.load_pickle])
def test_refuses_every_pickle_on_an_old_torch(monkeypatch, tensor_file, reader):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(ValueError, match=r"torch>=2\.6.*\.safetensors"):
        reader(tensor_file)
