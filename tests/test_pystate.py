"""watch_attributes: which component attributes a loop reads before writing (live-in) and which it writes."""

import pytest
import torch

from loopgraph.pystate import live_in, live_out, watch_attributes
from loopgraph.zoo.guidance import ClassifierFreeGuidance
from loopgraph.zoo.schedulers import build_scheduler


class Counter:
    def __init__(self):
        self.step = 7        # overwritten before it is read: not live-in
        self.total = 0       # read, then written: live-in
        self.untouched = "x"

    def run(self, i):
        self.step = i
        self.total = self.total + self.step


class Slotted:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 1


def test_reads_before_writes_and_writes_are_told_apart():
    counter = Counter()
    with watch_attributes({"c": counter}) as logs:
        assert isinstance(counter, Counter) and type(counter).__name__ == "Counter"
        for i in range(3):
            counter.run(i)
    assert type(counter) is Counter  # the class is restored
    assert logs["c"].read_first == {"total"}
    assert logs["c"].written == {"step", "total"}
    snapshot = {"c": dict(vars(counter))}
    assert live_in(snapshot, logs) == {"c": {"total": 3}}
    assert live_out(snapshot, logs, snapshot) == {"c": {"step": 2, "total": 3}}


def test_containers_changed_in_place_count_as_written():
    counter = Counter()
    counter.history = [0, 0]
    start = {"c": {k: list(v) if isinstance(v, list) else v for k, v in vars(counter).items()}}
    with watch_attributes({"c": counter}) as logs:
        counter.history[0] = counter.history[1]  # only read through getattr: never set as an attribute
        counter.history[1] = 5
    assert "history" not in logs["c"].written
    assert live_out({"c": dict(vars(counter))}, logs, start) == {"c": {"history": [0, 5]}}


def test_class_is_restored_when_the_block_raises():
    counter = Counter()
    with pytest.raises(RuntimeError), watch_attributes({"c": counter}):
        raise RuntimeError("boom")
    assert type(counter) is Counter


def test_objects_that_cannot_be_watched_count_as_fully_read_and_written():
    slotted = Slotted()
    with watch_attributes({"s": slotted}) as logs:
        slotted.value = 2
    assert not logs["s"].watched
    snapshot = {"s": {"value": 2}}
    assert live_in(snapshot, logs) == snapshot and live_out(snapshot, logs, {}) == snapshot


def test_zoo_guider_step_is_written_before_read_and_scheduler_index_is_read():
    guider = ClassifierFreeGuidance(4.0)
    scheduler = build_scheduler("flow_euler")
    scheduler.set_timesteps(4)
    sample = torch.zeros(1, 4, 2, 2)
    with watch_attributes({"guider": guider, "scheduler": scheduler}) as logs:
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=4, timestep=t)
            sample = scheduler.step(torch.ones_like(sample), t, sample, return_dict=False)[0]
    assert "_step" in logs["guider"].written and "_step" not in logs["guider"].read_first
    assert "_step_index" in logs["scheduler"].read_first and "_step_index" in logs["scheduler"].written
