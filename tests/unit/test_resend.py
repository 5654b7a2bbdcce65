"""The gateway's memory of what each vision replica holds (hash-only resend), without a server."""

from __future__ import annotations

from mmserve.resend import ReplicaMemory
from mmserve.wire import PixelLimits

CAT = ("cat-hash", PixelLimits())
DOG = ("dog-hash", PixelLimits())


def test_nothing_goes_hash_only_before_a_replica_answered():
    assert not ReplicaMemory().held_everywhere(CAT)


def test_an_image_goes_hash_only_once_every_replica_heard_from_holds_it():
    memory = ReplicaMemory()
    memory.answered("a", [CAT])
    assert memory.held_everywhere(CAT)
    memory.answered("b", [DOG])  # a second replica: it was never given the cat
    assert not memory.held_everywhere(CAT) and len(memory) == 2
    memory.answered("b", [CAT])
    assert memory.held_everywhere(CAT)


def test_a_restarted_replica_is_a_new_cache_and_the_old_one_is_forgotten():
    memory = ReplicaMemory(forget_after=4)
    memory.answered("before-restart", [CAT, DOG])
    memory.not_found("after-restart")  # the same address, a new process: it holds nothing
    assert not memory.held_everywhere(CAT)
    for _ in range(5):
        memory.answered("after-restart", [CAT])
    assert len(memory) == 1  # the old cache id has not answered for `forget_after` calls
    assert memory.held_everywhere(CAT) and not memory.held_everywhere(DOG)


def test_not_found_forgets_that_replica_only():
    memory = ReplicaMemory()
    memory.answered("a", [CAT])
    memory.answered("b", [CAT])
    memory.not_found("a")  # it evicted the image
    assert not memory.held_everywhere(CAT)
    memory.answered("a", [CAT])
    assert memory.held_everywhere(CAT)


def test_resize_bounds_are_part_of_what_a_replica_holds():
    memory = ReplicaMemory()
    memory.answered("a", [("h", PixelLimits(max_pixels=784))])
    assert memory.held_everywhere(("h", PixelLimits(max_pixels=784)))
    assert not memory.held_everywhere(("h", PixelLimits()))


def test_each_replica_remembers_at_most_its_budget_of_images():
    memory = ReplicaMemory(remember=2)
    memory.answered("a", [CAT, DOG])
    memory.answered("a", [("bird-hash", PixelLimits())])
    assert not memory.held_everywhere(CAT) and memory.held_everywhere(DOG)
