"""Shared pytest setup.

Runs before any test module is imported, hence before jax is: the
single-process test runs get 8 fake CPU devices. Multi-process tests
(tests/mp.py) configure their workers separately.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# Make `import tests.mp` work however pytest was invoked.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


# Modules whose tests share module-scoped jobs (fixtures that launch processes
# once for several tests). Under xdist's default distribution (-n N, that is
# --dist load) each of these modules is one unit of work, run by one worker,
# so that each job runs once rather than once per worker that gets one of its
# tests; the units start first (xdist sends the largest first), and every
# other test is handed out on its own, as under --dist load. (xdist's own
# xdist_group marks do not take effect with this pytest: they rename node ids.)
SHARED_JOB_MODULES = frozenset(
    f"tests/{name}.py"
    for name in (
        "test_agreement",
        "test_faults_kill",
        "test_faults_phases",
        "test_indexes",
        "test_manager_mp",
        "test_multiprocess",
        "test_orbax_mp",
        "test_pipeline_mp",
        "test_scale_sim",
        "test_scale_smoke",
        "test_share",
    )
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # another --dist was asked for: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class SharedJobModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in SHARED_JOB_MODULES else nodeid

    return SharedJobModules(config, log)
