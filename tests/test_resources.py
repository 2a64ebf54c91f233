"""avsa.resources: what a run needs against what the cluster can ever offer, and the minute-by-
minute report while the autoscaler is still adding nodes. The capacity probe runs against the
session's real local Ray."""

from __future__ import annotations

import logging
import time

import pytest

from avsa.config import compose
from avsa.errors import AvsaError
from avsa.resources import Needs, check_fits, cluster_capacity, needs, shortfall, wait_reports

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
