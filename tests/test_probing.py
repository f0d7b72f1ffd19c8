"""A stopping daemon gives up its probe runs at the next forward pass instead of waiting minutes for them."""

from __future__ import annotations

from smfd.config import SmfdConfig
from smfd.daemon.health import Heartbeats
from smfd.daemon.probing import Probing
from smfd.observe.metrics import Metrics


def _probing(tmp_path, model, stop=None) -> Probing:
    cfg = SmfdConfig.model_validate({"state_dir": str(tmp_path / "state")})
    probing = Probing(cfg, Metrics(), Heartbeats(), stop=stop)
    probing.start(model)
    return probing


def _stop_after(forwards: int):
    """A stop flag that turns on after the model ran `forwards` forward passes (it is read once per pass)."""
    reads = []

    def stop() -> bool:
        reads.append(True)
        return len(reads) > forwards

    return stop, reads


def test_a_stop_gives_up_the_base_measurement_and_the_next_start_measures_it_whole(tmp_path, tiny_memory_model):
    stop, reads = _stop_after(3)
    probing = _probing(tmp_path, tiny_memory_model, stop)
    probing.establish()
    assert probing.guard is None, "no guard from a half-measured base"
    assert len(reads) == 4, "given up at the first forward pass after the stop"
    assert not probing.probes.state_file.exists(), "nothing half-measured is kept"
    assert all(memory.enabled for memory in tiny_memory_model.memories), "the memory is switched back on"

    again = _probing(tmp_path, tiny_memory_model)
    again.establish()
    assert again.guard is not None and again.probes.state_file.is_file()


def test_a_stop_gives_up_a_full_probe_run_without_recording_it(tmp_path, tiny_memory_model):
    stopping = []
    probing = _probing(tmp_path, tiny_memory_model, stop=lambda: bool(stopping))
    probing.establish()
    stopping.append(True)
    probing.run_full(version=0)
    assert not probing.probes.last_file.exists(), "a probe run given up records nothing"
    stopping.clear()
    probing.run_full(version=0)
    assert probing.probes.last_file.is_file()
