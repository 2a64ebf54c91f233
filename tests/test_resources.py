"""avsa.resources: what a run needs against what the cluster can ever offer, and the minute-by-
minute report while the autoscaler is still adding nodes. The capacity probe runs against the
session's real local Ray."""

from __future__ import annotations

import logging
import time

import pytest

from avsa.config import compose
from avsa.errors import AvsaError
from avsa.resources import (
    Needs,
    check_fits,
    cluster_capacity,
    needs,
    node_resources,
    shortfall,
    wait_reports,
)

ONE_WORKER = Needs(driver_cpu=0.01, workers=1, cpu_per_worker=1.0, gpu_per_worker=0.0,
                   decode_cpu=1.0)


def test_needs_of_a_config_add_workers_decoding_and_driver():
    cfg = compose(["train.num_workers=2", "train.cpus_per_worker=3", "data.decode_cpus=0.5",
                   "train.use_gpu=true"])
    need = needs(cfg, driver_cpu=0.01)
    assert need.cpu == pytest.approx(6.51) and need.gpu == 2
    assert need.describe() == ("6.51 CPU (trial driver 0.01 CPU, 2 train worker(s) x 3 CPU, "
                               "decoding 0.5 CPU) and 2 GPU")


def test_a_trial_larger_than_the_cluster_is_refused_naming_both_sides():
    two = {"CPU": 2.0}
    assert shortfall(ONE_WORKER, two) == ["CPU"]
    with pytest.raises(AvsaError) as info:
        check_fits(ONE_WORKER, "one trial of sweep s", two, two)
    message = str(info.value)
    assert message.startswith("one trial of sweep s needs 2.01 CPU (trial driver 0.01 CPU, "
                              "1 train worker(s) x 1 CPU, decoding 1 CPU), but the cluster has "
                              "2 CPU, 0 GPU: it would wait forever")
    assert "\n" not in message


def test_the_autoscalers_maximum_counts():
    now, most = {"CPU": 1.0}, {"CPU": 16.0, "GPU": 4.0}
    check_fits(ONE_WORKER, "x", now, most)  # fits once the autoscaler adds nodes
    gpu = Needs(0.0, 8, 1.0, 1.0, 1.0)
    with pytest.raises(AvsaError, match=r"needs 9 CPU .* and 8 GPU, but the cluster has 1 CPU, "
                                        r"0 GPU \(up to 16 CPU, 4 GPU with its autoscaler\)"):
        check_fits(gpu, "pretraining r", now, most)


def test_a_worker_larger_than_every_node_is_refused_though_the_total_fits():
    # two 4-CPU nodes hold 8 CPU, but Ray places a 6-CPU worker whole on one node
    nodes = [{"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}]
    total = {"CPU": 8.0, "GPU": 1.0}
    big = Needs(0.0, 1, 6.0, 0.0, 1.0)
    with pytest.raises(AvsaError, match=r"^pretraining r: one train worker needs 6 CPU, 0 GPU on "
                                        r"one node \(train.cpus_per_worker\), but the largest "
                                        r"node has 4 CPU, 1 GPU: it would wait forever"):
        check_fits(big, "pretraining r", total, total, nodes)
    check_fits(Needs(0.0, 2, 3.0, 0.0, 1.0), "x", total, total, nodes)  # one worker per node
    check_fits(Needs(0.0, 1, 3.0, 1.0, 1.0), "x", total, total, nodes)  # the GPU node holds it
    with pytest.raises(AvsaError, match="one train worker needs 3 CPU, 1 GPU"):
        small_gpu = [nodes[0], {"CPU": 2.0, "GPU": 1.0}]
        check_fits(Needs(0.0, 1, 3.0, 1.0, 1.0), "x", total, total, small_gpu)
    # an autoscaler may add larger nodes: only the totals count
    check_fits(big, "x", total, {"CPU": 64.0, "GPU": 1.0}, nodes)


def test_waiting_for_the_autoscaler_is_reported_until_the_nodes_come(caplog):
    state = {"now": {"CPU": 1.0}}

    def probe():
        return dict(state["now"]), {"CPU": 8.0}

    caplog.set_level(logging.WARNING, logger="avsa.resources")
    with wait_reports(ONE_WORKER, "pretraining r", probe=probe, interval_s=0.05):
        time.sleep(0.3)
        waiting = [r.getMessage() for r in caplog.records]
        state["now"] = {"CPU": 8.0}
        time.sleep(0.2)
        caplog.clear()
        time.sleep(0.2)
    assert len(waiting) >= 2
    assert waiting[0] == ("pretraining r is waiting for the autoscaler: it needs 2.01 CPU "
                          "(trial driver 0.01 CPU, 1 train worker(s) x 1 CPU, decoding 1 CPU); "
                          "the cluster has 1 CPU, 0 GPU now, up to 8 CPU, 0 GPU")
    assert caplog.records == []  # quiet once the resources are there


@pytest.mark.slow
def test_capacity_of_a_real_local_ray(ray_session):
    now, most = cluster_capacity()
    assert now["CPU"] == 4.0  # the session's ray.init(num_cpus=4); no autoscaler
    assert most == now
    (node,) = node_resources()
    assert node["CPU"] == 4.0
