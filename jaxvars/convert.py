"""Rewrite pretrained weights as ``.safetensors``, so that a machine without PyTorch (a GPU
or TPU VM) can load them.

  python -m jaxvars.convert --source=imagenet --arch=efficientnet_lite0 --out=lite0.safetensors
  python -m jaxvars.convert --source=/data/resnet50-0676ba61.pth --out=resnet50.safetensors

``--source``: a PyTorch state dict (``.pth``/``.pt``, read with
``torch.load(..., weights_only=True)``: needs torch, which the ``pretrained`` extra installs
on a CPU machine) or ``imagenet`` (the weights file a pip package installed for
``--arch``). The output holds the same tensors under the same names; use it with
``--config.backbone.init=pretrained:<out>`` and the same ``--config.backbone.arch``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxvars.errors import JaxvarsError

_SOURCE = flags.DEFINE_string("source", None, "A .pth/.pt state dict, or 'imagenet'.")
_ARCH = flags.DEFINE_string("arch", "efficientnet_lite0",
                            "The backbone the weights are for (needed for --source=imagenet).")
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write.")
flags.mark_flags_as_required(["source", "out"])


def convert_to_safetensors(source: str, out: str, *, arch: str) -> int:
  """Writes the tensors of ``source`` to ``out``; returns how many.

  Raises:
    JaxvarsError: a missing or unreadable source, a missing weights package, or an output
      path that does not end in ``.safetensors``.
  """
  from jaxvars.backbones import weights
  if not out.endswith(".safetensors"):
    raise JaxvarsError(f"--out={out!r} must end in .safetensors")
  tensors = weights.read_torch_state_dict(weights.resolve_source(source, arch))
  weights.write_safetensors(tensors, out)
  return len(tensors)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    n = convert_to_safetensors(_SOURCE.value, _OUT.value, arch=_ARCH.value)
  except (JaxvarsError, ImportError) as e:
    print(f"jaxvars: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{n} tensors written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
