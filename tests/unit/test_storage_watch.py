"""The one list/watch loop (storage.watch.Reflector) against a scripted source, and the Table it
feeds: watch from the list's version, resume after the last event, list again on Gone, back off
on errors, count a watch that ends at once as a failure, never go back to an older version."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeSource
from support import wait_until

from ferry.storage import Gone, StorageError
from ferry.storage.watch import Changed, DeliveryClosed, Listed, Reflector, Table, newer, newer_version

NS = "ns"


def obj(name: str, rv: int | str, **labels: str) -> dict:
    return {"kind": "Droplet", "metadata": {"name": name, "namespace": NS, "resourceVersion": str(rv),
                                            "labels": labels}}


def bookmark(rv: int) -> tuple[str, dict]:
    return ("BOOKMARK", {"metadata": {"resourceVersion": str(rv)}})


class RecordingBackoff:
    """A Backoff that answers at once and remembers which failure counts it was asked about."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def delay(self, failures: int) -> float:
        self.asked.append(failures)
        return 0.0


def run_script(source: FakeSource, **options) -> tuple[list, Reflector]:
    """Run a reflector until the script is over; returns what it delivered."""
    updates: list = []
    options.setdefault("backoff", RecordingBackoff())
    options.setdefault("min_watch_seconds", 0)
    reflector = Reflector(source, updates.append, **options)
    reflector.start()
    wait_until(source.idle.is_set, 10, interval=0.01, what="the reflector to get through the script")
    reflector.stop()
    assert reflector.thread is not None and not reflector.thread.is_alive()
    return updates, reflector


def test_list_then_watch_from_its_version_and_resume_after_the_last_event():
    source = FakeSource(lists=[([obj("a", 5), obj("b", 6)], "10")],
                        watches=[[("MODIFIED", obj("a", 11)), ("DELETED", obj("b", 12)), ("ADDED", obj("c", 13))]])
    updates, reflector = run_script(source)
    assert updates[0] == Listed((obj("a", 5), obj("b", 6)), "10")
    assert [(u.type, u.object["metadata"]["name"], u.resource_version) for u in updates[1:]] == [
        ("MODIFIED", "a", "11"), ("DELETED", "b", "12"), ("ADDED", "c", "13")]
    assert source.watch_calls == ["10", "13"]  # the stream ended: watch again after the last event
    assert reflector.synced.is_set() and reflector.lists == 1


def test_bookmarks_move_the_version_on_without_a_delivery():
    source = FakeSource(lists=[([obj("a", 5)], "10")], watches=[[bookmark(50)], [("MODIFIED", obj("a", 51))]])
    updates, _ = run_script(source)
    assert source.watch_calls == ["10", "50", "51"]
    assert [type(u) for u in updates] == [Listed, Changed]


def test_never_goes_back_to_an_older_version():
    source = FakeSource(lists=[([], "10")],
                        watches=[[("MODIFIED", obj("a", 20)), bookmark(15), ("MODIFIED", obj("b", 12))],
                                 [bookmark(9)]])
    _, reflector = run_script(source)
    assert source.watch_calls == ["10", "20", "20"]
    assert reflector.resource_version == "20"


def test_gone_in_the_stream_lists_again_and_watches_from_the_new_list():
    source = FakeSource(lists=[([obj("a", 5), obj("b", 6)], "10"), ([obj("a", 30)], "40")],
                        watches=[[("MODIFIED", obj("b", 11)), Gone("too old")]])
    updates, reflector = run_script(source)
    assert source.list_calls == 2
    assert [type(u) for u in updates] == [Listed, Changed, Listed]
    assert updates[2] == Listed((obj("a", 30),), "40")
    assert source.watch_calls == ["10", "40"]
    assert reflector.expired == 1 and reflector.failures_total == 0


def test_gone_on_the_watch_request_lists_again():
    source = FakeSource(lists=[([], "10"), ([obj("a", 41)], "41")], watches=[Gone("gone")])
    _, reflector = run_script(source)
    assert source.watch_calls == ["10", "41"]
    assert reflector.lists == 2


def test_gone_again_right_after_a_list_backs_off():
    backoff = RecordingBackoff()
    source = FakeSource(lists=[([], "1"), ([], "2"), ([], "3"), ([], "4")], watches=[Gone("x"), Gone("x"), Gone("x")])
    _, reflector = run_script(source, backoff=backoff)
    assert reflector.expired == 3 and source.list_calls == 4
    assert backoff.asked == [1, 2]  # the first Gone lists at once; the next ones wait longer each time


def test_errors_back_off_and_resume_from_the_last_version_without_listing():
    backoff = RecordingBackoff()
    source = FakeSource(lists=[([obj("a", 5)], "10")],
                        watches=[[("MODIFIED", obj("a", 11)), ConnectionResetError("reset")],
                                 StorageError("refused"), StorageError("etcd down (HTTP 500)"),
                                 [("MODIFIED", obj("a", 12))], RuntimeError("again")])
    _, reflector = run_script(source, backoff=backoff)
    assert source.list_calls == 1
    assert source.watch_calls == ["10", "11", "11", "11", "12", "12"]
    assert reflector.failures_total == 4
    assert backoff.asked == [1, 2, 3, 1]  # growing while failing, from the start after a good watch


def test_a_failing_list_is_retried_with_backoff():
    backoff = RecordingBackoff()
    source = FakeSource(lists=[StorageError("unavailable"), ConnectionRefusedError(), ([], "7")], watches=[])
    updates, reflector = run_script(source, backoff=backoff)
    assert source.list_calls == 3 and backoff.asked == [1, 2]
    assert updates == [Listed((), "7")]


def test_a_watch_that_ends_at_once_without_events_is_a_failure():
    backoff = RecordingBackoff()
    source = FakeSource(lists=[([], "1")], watches=[[], [], [], [bookmark(2)]])
    _, reflector = run_script(source, backoff=backoff, min_watch_seconds=60)
    assert reflector.failures_total == 3 and backoff.asked == [1, 2, 3]
    assert source.list_calls == 1  # resumed, not listed again
    assert source.watch_calls == ["1", "1", "1", "1", "2"]


def test_other_event_types_are_skipped_not_fatal():
    source = FakeSource(lists=[([], "10")], watches=[[("WEIRD", obj("z", 12)), ("ADDED", obj("a", 13))]])
    updates, reflector = run_script(source)
    assert [u.object["metadata"]["name"] for u in updates if isinstance(u, Changed)] == ["a"]
    assert reflector.failures_total == 0


def test_delivery_closed_ends_the_loop():
    source = FakeSource(lists=[([], "1")], watches=[])

    def deliver(_update):
        raise DeliveryClosed()

    reflector = Reflector(source, deliver)
    thread = reflector.start()
    thread.join(5)
    assert not thread.is_alive()
    assert source.watch_calls == []


def test_stop_interrupts_a_blocked_watch():
    source = FakeSource(lists=[([], "1")], watches=[])
    reflector = Reflector(source, lambda u: None)
    thread = reflector.start()
    wait_until(source.idle.is_set, 5, interval=0.01, what="the watch to block")
    reflector.stop(timeout=5)
    assert not thread.is_alive() and source.closed.is_set()


def test_a_shared_stop_event_ends_a_backoff_wait_at_once():
    class Long(RecordingBackoff):
        def delay(self, failures: int) -> float:
            super().delay(failures)
            return 600.0

    stop = threading.Event()
    backoff = Long()
    source = FakeSource(lists=[StorageError("down")], watches=[])
    reflector = Reflector(source, lambda u: None, stop=stop, backoff=backoff)
    thread = reflector.start()
    wait_until(lambda: backoff.asked == [1], 5, interval=0.01, what="the first backoff")
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and source.list_calls == 1


# --- a Table fed by a reflector ------------------------------------------------------------------

def test_a_table_follows_lists_and_events_and_a_new_list_replaces_everything():
    source = FakeSource(lists=[([obj("a", 1), obj("b", 2)], "2"), ([obj("c", 20)], "20")],
                        watches=[[("MODIFIED", obj("a", 3)), ("DELETED", obj("b", 4)), bookmark(5)],
                                 StorageError("connection reset"), Gone("410")])
    table = Table()
    changed: list = []

    def deliver(update):
        changed.extend(table.apply_update(update))

    reflector = Reflector(source, deliver, backoff=RecordingBackoff(), min_watch_seconds=0)
    reflector.start()
    wait_until(source.idle.is_set, 10, interval=0.01)
    reflector.stop()
    assert source.watch_calls == ["2", "5", "5", "20"]
    assert set(table.snapshot()) == {(NS, "c")}  # the second list replaced everything (a gone)
    assert {(NS, "a"), (NS, "b"), (NS, "c")} <= set(changed)


def test_table_never_goes_back():
    t = Table()
    t.replace([obj("x", "10")])
    t.apply("MODIFIED", obj("x", "9"))
    assert t.snapshot()[(NS, "x")]["metadata"]["resourceVersion"] == "10"
    t.update_if_present(obj("x", "12"))
    t.update_if_present(obj("y", "12"))  # not in this stream: ignored
    assert set(t.snapshot()) == {(NS, "x")} and t.snapshot()[(NS, "x")]["metadata"]["resourceVersion"] == "12"
    t.apply("DELETED", obj("x", "13"))
    assert t.snapshot() == {}


@pytest.mark.parametrize("a, b, expected", [("10", "9", True), ("9", "10", False), ("10", "10", True),
                                            ("abc", "10", True), ("10", None, True), ("10", "", True)])
def test_newer_version(a, b, expected):
    assert newer_version(a, b) is expected
    assert newer(obj("x", a), obj("x", b) if b is not None else None) is expected
