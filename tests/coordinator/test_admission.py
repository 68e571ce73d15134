"""Admission: bounds on what waits, and whose request runs next."""
import pytest

from amusd_mq.coordinator.admission import Admission, Refused

A, B, C = b"a", b"b", b"c"


def admitted(adm: Admission, client: bytes, rid: str) -> str:
    adm.admit(client)
    adm.enqueue(client, rid)
    return rid


def test_clients_take_turns_and_keep_their_own_order():
    adm = Admission(max_queued=100, per_client=100)
    for i in range(5):
        admitted(adm, A, f"a{i}")  # a flood from one client
    admitted(adm, B, "b0")
    admitted(adm, C, "c0")
    admitted(adm, B, "b1")
    order = [adm.next() for _ in range(8)]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    assert adm.next() is None and adm.waiting == 0


def test_a_resumed_request_goes_first():
    adm = Admission(max_queued=100, per_client=100)
    admitted(adm, A, "a0")
    admitted(adm, B, "b0")
    assert adm.next() == "a0"
    adm.resume("a0")  # its verifier was lost
    assert adm.waiting == 2
    assert [adm.next(), adm.next()] == ["a0", "b0"]


def test_per_client_limit_counts_every_request_in_flight():
    adm = Admission(max_queued=100, per_client=2)
    admitted(adm, A, "a0")
    adm.admit(A)  # the second is still being tokenized
    with pytest.raises(Refused) as err:
        adm.admit(A)
    assert err.value.code == "too_many_requests" and "AMUSD_MAX_CLIENT_REQUESTS" in str(err.value)
    admitted(adm, B, "b0")  # other clients are not affected
    assert adm.next() == "a0"
    with pytest.raises(Refused):
        adm.admit(A)  # running still counts
    adm.release(A, "a0")
    adm.admit(A)


def test_queue_bound_counts_waiting_not_running():
    adm = Admission(max_queued=2, per_client=100)
    admitted(adm, A, "a0")
    admitted(adm, B, "b0")
    with pytest.raises(Refused) as err:
        adm.admit(C)
    assert err.value.code == "queue_full" and "AMUSD_MAX_QUEUE" in str(err.value)
    assert adm.next() == "a0"
    admitted(adm, C, "c0")
    assert adm.waiting == 2


def test_release_from_anywhere():
    adm = Admission(max_queued=10, per_client=10)
    admitted(adm, A, "a0")
    admitted(adm, A, "a1")
    adm.admit(B)  # tokenizing, never enqueued
    assert adm.next() == "a0"
    adm.release(A, "a1")  # cancelled while queued
    adm.release(B, "b-never-queued")
    adm.resume("a0")
    adm.release(A, "a0")  # failed while resuming
    assert adm.waiting == 0 and not adm.in_flight and adm.next() is None
