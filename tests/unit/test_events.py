"""The operator's Event correlation: client-go's recorder defaults, table by table."""

import asyncio

from ferry.controller.events import COMBINED, SPAM_BURST, Correlator, EventRecorder

OBJ = ("LiveMigration", "ns", "m", "uid-m")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_distinct_events_are_posted_each():
    c = Correlator(Clock())
    verdicts = [c.judge(OBJ, "Normal", r, f"{r} happened") for r in ("Announced", "Scheduled", "Completed")]
    assert [v.action for v in verdicts] == ["post"] * 3


def test_an_identical_event_raises_the_count_and_is_new_after_ten_minutes():
    clock = Clock()
    c = Correlator(clock)
    assert c.judge(OBJ, "Warning", "Retry", "attempt failed").action == "post"
    again = c.judge(OBJ, "Warning", "Retry", "attempt failed")
    assert (again.action, again.count) == ("repeat", 2)
    assert c.judge(("LiveMigration", "ns", "other", "u"), "Warning", "Retry", "attempt failed").action == "post"
    clock.t += 601
    assert c.judge(OBJ, "Warning", "Retry", "attempt failed").action == "post"


def test_more_than_ten_similar_messages_are_combined_into_one_event():
    c = Correlator(Clock())
    verdicts = [c.judge(OBJ, "Normal", "Waiting", f"slot {i}") for i in range(14)]
    assert [v.action for v in verdicts[:10]] == ["post"] * 10
    assert verdicts[10].action == "post" and verdicts[10].message == COMBINED + "slot 10"
    assert [(v.action, v.count) for v in verdicts[11:]] == [("repeat", 2), ("repeat", 3), ("repeat", 4)]


def test_spam_filter_drops_over_the_burst_and_refills_one_per_five_minutes():
    clock = Clock()
    c = Correlator(clock)
    verdicts = [c.judge(OBJ, "Normal", f"R{i}", "x") for i in range(SPAM_BURST + 3)]
    assert [v.action for v in verdicts].count("drop") == 3
    assert c.judge(("Droplet", "ns", "d", "u"), "Normal", "R", "x").action == "post"  # per object
    clock.t += 300
    assert c.judge(OBJ, "Normal", "Later", "x").action == "post"
    assert c.judge(OBJ, "Normal", "Later2", "x").action == "drop"


def test_recorder_posts_then_patches_the_count():
    calls = []

    class Kube:
        def event(self, obj, type_, reason, message):
            calls.append(("post", reason, message))
            return f"ev{len(calls)}"

        def event_repeat(self, ns, name, count):
            calls.append(("repeat", name, count))

    async def call(fn, *args):
        return fn(*args)

    async def main():
        r = EventRecorder(Kube(), call)
        task = asyncio.create_task(r.run())
        obj = {"kind": "LiveMigration", "metadata": {"namespace": "ns", "name": "m", "uid": "u"}}
        for _ in range(3):
            r.record(obj, "Warning", "Retry", "failed")
        await r.join()
        task.cancel()
        return r

    r = asyncio.run(main())
    assert calls == [("post", "Retry", "failed"), ("repeat", "ev1", 2), ("repeat", "ev1", 3)]
    assert (r.posted, r.repeated, r.dropped) == (1, 2, 0)


def test_posters_keep_each_objects_events_in_order():
    """Several tasks post at once; the Events of one object all go through one of them, in order."""
    calls = []

    class Kube:
        def event(self, obj, type_, reason, message):
            calls.append((obj["metadata"]["name"], reason))
            return f"ev{len(calls)}"

        def event_repeat(self, ns, name, count):
            raise AssertionError("no repeats here")

    async def call(fn, *args):
        await asyncio.sleep(0)  # let the other posters run in between
        return fn(*args)

    async def main():
        r = EventRecorder(Kube(), call, posters=4)
        task = asyncio.create_task(r.run())
        names = [f"m{i}" for i in range(20)]
        for reason in ("Accepted", "Announced", "Scheduling", "TargetChosen"):
            for n in names:
                r.record({"kind": "LiveMigration", "metadata": {"namespace": "ns", "name": n, "uid": n}},
                         "Normal", reason, f"{n} {reason}")
        await r.join()
        task.cancel()
        return names

    names = asyncio.run(main())
    assert len(calls) == 80
    for n in names:
        assert [reason for name, reason in calls if name == n] == ["Accepted", "Announced", "Scheduling",
                                                                   "TargetChosen"]
