"""The event hub takes events from other threads too (log lines of worker threads)."""

from __future__ import annotations

import asyncio
import json
import threading

from lxd_daemon.events import EventHub


def test_publish_threadsafe_from_another_thread_reaches_listeners():
    async def main():
        hub = EventHub()
        hub.bind_loop(asyncio.get_running_loop())
        listener = hub.subscribe(["logging"], project="p1")
        t = threading.Thread(target=hub.publish_threadsafe, args=("logging", {"message": "hi"}),
                             kwargs={"project": "p1"})
        t.start()
        t.join()
        return json.loads(await asyncio.wait_for(listener.queue.get(), 5))

    event = asyncio.run(main())
    assert event["type"] == "logging" and event["project"] == "p1" and event["metadata"] == {"message": "hi"}


def test_taps_see_their_event_types_even_without_listeners_and_a_failing_tap_stops_nothing():
    hub = EventHub()
    seen = []
    hub.tap(["lifecycle"], lambda kind, meta: seen.append(meta["action"]))
    hub.tap(["lifecycle"], lambda kind, meta: 1 / 0)
    hub.lifecycle("image-created", "/1.0/images/ab")
    hub.publish("logging", {"message": "x"})
    assert seen == ["image-created"]


def test_listeners_get_their_projects_events_and_only_unrestricted_ones_the_servers():
    async def main():
        hub = EventHub()
        one = hub.subscribe(["lifecycle", "logging"], project="p1")
        every = hub.subscribe(["lifecycle", "logging"], all_projects=True)
        confined = hub.subscribe(["lifecycle", "logging"], all_projects=True, visible=["p1", "p2"],
                                 server_wide=False)
        narrowed = hub.subscribe(["lifecycle"], project="p3", visible=["p1"], server_wide=False)
        for p in ("default", "p1", "p2", "p3"):
            hub.lifecycle("instance-created", f"/1.0/instances/c1?project={p}", project=p)
        hub.publish("logging", {"message": "server"}, project="")

        def drain(lis):
            out = []
            while not lis.queue.empty():
                ev = json.loads(lis.queue.get_nowait())
                out.append(ev.get("project", "") if ev["type"] == "lifecycle" else "log")
            return out

        return drain(one), drain(every), drain(confined), drain(narrowed)

    one, every, confined, narrowed = asyncio.run(main())
    assert one == ["p1", "log"]
    assert every == ["default", "p1", "p2", "p3", "log"]
    assert confined == ["p1", "p2"]
    assert narrowed == []
