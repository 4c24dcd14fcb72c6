"""Placement plan: one Ray placement group per role, created in one place and checked after start.

    role      bundles                         strategy (spread_roles=false / true)
    learner   trainer.num_ranks × {CPU, GPU}  PACK / SPREAD
    rollout   rollout.num_workers × {...}     PACK / SPREAD
    teacher   teacher.num_replicas × {...}    PACK / SPREAD
    teacher_sampler  as rollout (only with objective.seq_kd)

With `cluster.spread_roles` each group's bundles go to different nodes where possible; with it off
Ray packs them (one node, or the fewest nodes). Actors are pinned with
PlacementGroupSchedulingStrategy(pg, bundle_index) so the plan is the placement.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launch.config import ConfigError, RunConfig


@dataclass
class RolePlacement:
    group: PlacementGroup
    bundles: list[dict]

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index,
                                                placement_group_capture_child_tasks=True)

    def slots(self) -> list[tuple[PlacementGroup, int]]:
        return [(self.group, i) for i in range(len(self.bundles))]


def _bundle(cpus: float, gpus: float) -> dict:
    b = {"CPU": cpus}
    if gpus > 0:
        b["GPU"] = gpus
    return b


def role_bundles(cfg: RunConfig) -> dict[str, list[dict]]:
    roles = {
        "learner": [_bundle(cfg.trainer.num_cpus, cfg.trainer.num_gpus)] * cfg.trainer.num_ranks,
        "rollout": [_bundle(cfg.rollout.num_cpus, cfg.rollout.gpus_per_worker(cfg.trainer.device))] * cfg.rollout.num_workers,
    }
    if cfg.objective.seq_kd:  # rollout workers on the teacher's weights, for sequence-level KD batches
        roles["teacher_sampler"] = roles["rollout"]
    if cfg.teacher.backend == "ray":
        roles["teacher"] = [_bundle(cfg.teacher.num_cpus, cfg.teacher.num_gpus)] * cfg.teacher.num_replicas
    return roles


def _check_fits(roles: dict[str, list[dict]]) -> None:
    """On a fixed-size cluster, fail at once (not after a timeout) when the roles ask for more than exists."""
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    need: dict[str, float] = {}
    for bundles in roles.values():
        for b in bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
    short = {k: (v, total.get(k, 0.0)) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if short:
        per_role = "; ".join(f"{role}: {bundles}" for role, bundles in roles.items())
        raise ConfigError(f"the roles need {', '.join(f'{v:g} {k}' for k, (v, _) in short.items())} but the Ray "
                           f"cluster has {', '.join(f'{t:g} {k}' for k, (_, t) in short.items())} ({per_role}). Lower "
                           f"the counts or CPU/GPU shares in the config, raise cluster.num_cpus, or add nodes.")


def create_placement(cfg: RunConfig, timeout_s: float = 120.0) -> dict[str, RolePlacement]:
    """Reserve every role's resources up front; fails with the missing resources if the cluster is too small.

    A local cluster (cluster.address unset) cannot grow, so a shortfall fails at once; on a joined
    cluster an autoscaler may still add nodes, so each role waits up to `timeout_s`.
    """
    strategy = "SPREAD" if cfg.cluster.spread_roles else "PACK"
    run_id = uuid.uuid4().hex[:8]  # names are unique per cluster; several runs (or tests) may share one
    roles = role_bundles(cfg)
    if cfg.cluster.address is None:
        _check_fits(roles)
    out = {}
    for role, bundles in roles.items():
        pg = placement_group(bundles, strategy=strategy, name=f"minillm-{role}-{run_id}")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            release(out)  # no reservation outlives a failed start
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise RuntimeError(f"could not reserve resources for the {role} role: bundles {bundles} (strategy "
                               f"{strategy}) within {timeout_s:.0f} s; cluster total {total}, free now {free}. "
                               f"Lower {role} counts or CPU/GPU shares in the config, or add nodes.")
        out[role] = RolePlacement(pg, bundles)
    return out


def release(placement: dict[str, RolePlacement]) -> None:
    for p in placement.values():
        remove_placement_group(p.group)
