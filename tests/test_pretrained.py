"""Converted torchvision / Keras weights reproduce a PyTorch reference forward pass."""

import os

import jax
import numpy as np
import pytest

from conftest import missing_references, needs_references
from jaxvars.errors import DataError
from jaxvars.backbones import resnet_import, weights
from jaxvars.backbones.resnet import make_resnet

# The PyTorch reference: every test is skipped with a reason where torch is not installed,
# and fails under CI, whose test extra installs it (conftest.require_references).
pytestmark = needs_references("torch")
if not missing_references("torch"):
  import torch
  from safetensors.torch import save_file
  import torch_resnet

_RESNET = {"width": 64, "small_stem": False}  # config.backbone fields the ResNet builder reads.


def _compare(net, model, variables, size=64):
  x = np.random.default_rng(0).random((2, size, size, 3), dtype=np.float32)
  want = net(x)
  got = jax.device_get(model.apply(variables, x))
  for key in ("stage2", "stage3", "stage4", "pooled"):
    diff = np.max(np.abs(got[key] - want[key]))
    assert diff < 1e-4, (key, diff, np.max(np.abs(want[key])))
  assert np.max(np.abs(want["pooled"])) > 0.05  # The comparison is not between zeros.


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_torchvision_weights_match_torch(arch, fmt, tmp_path):
  net = torch_resnet.randomised(arch, seed=1)
  path = str(tmp_path / f"{arch}{fmt}")
  state = {k: v for k, v in net.state_dict().items()}
  torch.save(state, path) if fmt == ".pth" else save_file(state, path)
  model, variables = weights.load_pretrained(path, arch=arch, backbone_config=_RESNET)
  assert model.style == "torchvision"
  _compare(net, model, variables)
  # Converted once: the Orbax cache is read back to identical arrays.
  assert os.path.isdir(weights.cache_path(path, arch))  # <file>.jaxvars-<arch>-<sha256>
  _, again = weights.load_pretrained(path, arch=arch, backbone_config=_RESNET)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("group", [True, False])
def test_keras_h5_matches_torch(group, tmp_path):
  net = torch_resnet.randomised("resnet50", keras=True, seed=2)
  path = str(tmp_path / "resnet50.h5")
  torch_resnet.save_keras_h5(net, path, model_weights_group=group)
  model, variables = weights.load_pretrained(path, arch="resnet50", backbone_config=_RESNET)
  assert model.style == "keras"
  _compare(net, model, variables)


def test_missing_and_mismatched_tensors_are_named(tmp_path):
  state = torch_resnet.randomised("resnet18").state_dict()
  model = make_resnet("resnet18")
  missing = dict(state)
  del missing["layer2.0.downsample.1.running_var"]
  torch.save(missing, tmp_path / "missing.pth")
  with pytest.raises(DataError, match=r"tensor 'layer2.0.downsample.1.running_var' \(for "
                     r"batch_stats/layer2_0/downsample_bn/var\) is missing; expected shape \(128,\)"):
    resnet_import.convert(str(tmp_path / "missing.pth"), model)
  with pytest.raises(DataError, match=r"tensor 'bn1.running_mean' \(for batch_stats/bn1/mean\) "
                     r"has shape \(64,\), expected \(128,\)"):
    resnet_import.convert(str(tmp_path / "missing.pth"), make_resnet("resnet18", width=128))


def test_truncated_and_unsafe_files_are_refused(tmp_path):
  state = torch_resnet.randomised("resnet18").state_dict()
  torch.save(state, tmp_path / "ok.pth")
  data = (tmp_path / "ok.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=r"cut\.pth: cannot load as a weights-only torch checkpoint"):
    weights.read_torch_state_dict(str(tmp_path / "cut.pth"))
  torch.save({"model": torch_resnet.Basic(3, 3, 1, False)}, tmp_path / "code.pth")  # A pickled class.
  with pytest.raises(DataError, match=r"code\.pth: cannot load as a weights-only"):
    weights.read_torch_state_dict(str(tmp_path / "code.pth"))
  (tmp_path / "cut.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
  with pytest.raises(DataError, match=r"cut\.h5: cannot read HDF5 file"):
    weights.read_keras_h5(str(tmp_path / "cut.h5"))
  with pytest.raises(DataError, match="weights file is missing"):
    weights.read_torch_state_dict(str(tmp_path / "nope.safetensors"))
