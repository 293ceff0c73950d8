"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared fixtures."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_HM = REPO.parent / "shared" / "data" / "hm"
sys.path.insert(0, str(REPO))  # For `import configs.joint`.


def tiny_config(tfds_dir, **overrides):
  """The tiny synthetic preset with tfds output in ``tfds_dir``."""
  from configs import joint
  config = joint.get_config("tiny")
  config.data.tfds_dir = str(tfds_dir)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_data(tfds_dir):
  """The tiny synthetic dataset, prepared once per test session."""
  from jaxvars.data import pipeline
  return pipeline.load(tiny_config(tfds_dir).data, workdir=None)


def requires_hm():
  return pytest.mark.skipif(not (SHARED_HM / "transactions_train.csv").exists(),
                            reason=f"real H&M sample not found at {SHARED_HM} (a user's clone "
                            "without ../shared); CI has it")
