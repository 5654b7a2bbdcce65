"""The gateway's memory of what each vision replica holds (hash-only resend), without a server."""

from __future__ import annotations

from mmserve.resend import ReplicaMemory
from mmserve.wire import PixelLimits

CAT = ("cat-hash", PixelLimits())
DOG = ("dog-hash", PixelLimits())


def test_nothing_goes_hash_only_before_a_replica_answered():
    assert not ReplicaMemory().holds("a", CAT)
    assert not ReplicaMemory().holds(None, CAT)


def test_what_one_replica_was_given_says_nothing_of_another():
    memory = ReplicaMemory()
    memory.answered("a", [CAT])
    assert memory.holds("a", CAT)
    memory.answered("b", [DOG])  # a second replica: it was never given the cat
    assert not memory.holds("b", CAT) and memory.holds("b", DOG) and len(memory) == 2
    assert not memory.holds(None, CAT)  # a replica that has not answered yet holds nothing we know of


def test_a_restarted_replica_is_a_new_cache_and_the_old_one_is_forgotten():
    memory = ReplicaMemory(forget_after=4)
    memory.answered("before-restart", [CAT, DOG])
    memory.not_found("after-restart")  # the same address, a new process: it holds nothing
    assert not memory.holds("after-restart", CAT)
    for _ in range(5):
        memory.answered("after-restart", [CAT])
    assert len(memory) == 1  # the old cache id has not answered for `forget_after` calls
    assert memory.holds("after-restart", CAT) and not memory.holds("after-restart", DOG)
    assert not memory.holds("before-restart", CAT)


def test_not_found_forgets_that_replica_only():
    memory = ReplicaMemory()
    memory.answered("a", [CAT])
    memory.answered("b", [CAT])
    memory.not_found("a")  # it evicted the image
    assert not memory.holds("a", CAT) and memory.holds("b", CAT)
    memory.answered("a", [CAT])
    assert memory.holds("a", CAT)


def test_resize_bounds_are_part_of_what_a_replica_holds():
    memory = ReplicaMemory()
    memory.answered("a", [("h", PixelLimits(max_pixels=784))])
    assert memory.holds("a", ("h", PixelLimits(max_pixels=784)))
    assert not memory.holds("a", ("h", PixelLimits()))


def test_each_replica_remembers_at_most_its_budget_of_images():
    memory = ReplicaMemory(remember=2)
    memory.answered("a", [CAT, DOG])
    memory.answered("a", [("bird-hash", PixelLimits())])
    assert not memory.holds("a", CAT) and memory.holds("a", DOG)
