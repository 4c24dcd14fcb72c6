"""Placement on a local cluster: a shortfall fails at once, naming what is missing, and reserves nothing."""
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table

from launch.config import ConfigError, load_config
from launch.placement import create_placement, release, role_bundles


@pytest.fixture(scope="module")
def small_cluster():
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


def _live_groups():
    return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]


def test_roles_that_fit_are_reserved_and_released(small_cluster):
    cfg = load_config(None, ["rollout.num_cpus=1", "teacher.num_cpus=1", "trainer.num_cpus=1"])
    placement = create_placement(cfg)
    assert set(placement) == set(role_bundles(cfg)) == {"learner", "rollout", "teacher"}
    assert len(_live_groups()) == 3
    release(placement)
    assert _live_groups() == []


def test_a_shortfall_fails_at_once_and_reserves_nothing(small_cluster):
    cfg = load_config(None, ["rollout.num_cpus=2", "teacher.num_cpus=1", "trainer.num_cpus=1"])  # 4 CPUs > 3
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"the roles need 4 CPU but the Ray cluster has 3 CPU"):
        create_placement(cfg, timeout_s=60)
    assert time.perf_counter() - t0 < 10  # not the 60 s wait
    assert _live_groups() == []
