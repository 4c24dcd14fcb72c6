"""The per-phase GPU monitor: peak memory and mean utilisation of each lap, from scripted readings."""
import itertools
import time

from trainer.gpu_monitor import GpuMonitor


def test_laps_report_each_phases_peak_and_mean_then_restart():
    readings = iter([(1.0, 10.0), (5.0, 30.0), (2.0, 50.0),   # phase a: three samples
                     (3.0, 0.0)])                            # phase b: one sample
    mon = GpuMonitor(read=lambda: next(readings), interval_s=3600)  # no background sample in this test
    for _ in range(2):
        mon._sample()
    a = mon.lap("a")  # takes the third reading itself
    assert a == {"gpu/mem_peak_gb/a": 5.0, "gpu/util/a": 30.0}
    assert mon.lap("b") == {"gpu/mem_peak_gb/b": 3.0, "gpu/util/b": 0.0}
    mon.close()


def test_background_thread_samples_and_stops():
    count = itertools.count()
    mon = GpuMonitor(read=lambda: (float(next(count)), 100.0), interval_s=0.01)
    time.sleep(0.2)
    out = mon.lap("x")
    mon.close()
    assert out["gpu/mem_peak_gb/x"] >= 5  # several readings arrived in 0.2 s; the peak is the latest
    assert out["gpu/util/x"] == 100.0


def test_off_without_a_gpu():
    mon = GpuMonitor.for_device("cpu")
    assert mon.lap("generate") == {}
    mon.close()
