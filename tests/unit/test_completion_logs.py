"""A sampler's completion logs (core/completions.py, for retrieve_futures and
join_sampling_session) go when the sampler ends: its session finished by the client, or
expired for want of heartbeats. Otherwise every sampler a long-running server ever served
would keep its log in memory."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from tinkerd.core.access import LOCAL_USER
from tinkerd.core.completions import CLONE_STRIDE
from tinkerd.core.service import Service

# create_sampling_session on a base model only looks the engine up: no model is loaded here.
ENGINES = {"m": SimpleNamespace(info=SimpleNamespace(max_context=64))}


async def sampler_with_logs(service: Service) -> tuple[str, str]:
    """A live sampler whose original client and one joined clone have each logged a completion."""
    session = service.create_session([], {}, LOCAL_USER)
    sampler_id = service.create_sampling_session(session, 0, "m", None, LOCAL_USER)
    clone = service.completions.join(sampler_id)
    for seq_id in (1, clone * CLONE_STRIDE + 1):
        entry = service.futures.create("sample", session, owner=LOCAL_USER.name)
        service.completions.track(sampler_id, seq_id, entry)
        service.futures.resolve(entry, result={})
    done, _ = await service.completions.poll(sampler_id, 0, 0, 5.0, [])
    assert len(done) == 1
    done, _ = await service.completions.poll(sampler_id, clone, 0, 5.0, [])
    assert len(done) == 1
    assert service.completions.holds(sampler_id)
    return session, sampler_id


def run(tmp_path, scenario, **service_args) -> None:
    async def main() -> None:
        service = Service(tmp_path / "data", ENGINES, **service_args)  # type: ignore[arg-type]
        service.futures.bind_loop(asyncio.get_running_loop())
        await scenario(service)
    asyncio.run(main())


def test_a_finished_sessions_samplers_lose_their_completion_logs(tmp_path):
    async def scenario(service: Service) -> None:
        session, sampler_id = await sampler_with_logs(service)
        _, other_sampler = await sampler_with_logs(service)
        service.finish_session(session, LOCAL_USER)
        assert not service.completions.holds(sampler_id)
        assert service.completions.holds(other_sampler)  # another session's sampler keeps its log

    run(tmp_path, scenario)


def test_an_expired_sessions_samplers_lose_their_completion_logs(tmp_path):
    async def scenario(service: Service) -> None:
        _, sampler_id = await sampler_with_logs(service)
        # No heartbeat: the session's last sign of life is moved past the timeout.
        for session in service.session_seen:
            service.session_seen[session] -= service.session_timeout + 1
        assert service.expire_idle_sessions()
        assert not service.completions.holds(sampler_id)

    run(tmp_path, scenario)


def test_a_poll_waiting_on_an_ended_sampler_answers_at_once(tmp_path):
    async def scenario(service: Service) -> None:
        session, sampler_id = await sampler_with_logs(service)
        waiting = asyncio.ensure_future(service.completions.poll(sampler_id, 0, 1, 600.0, []))
        for _ in range(3):  # the poll is now awaiting a completion
            await asyncio.sleep(0)
        service.finish_session(session, LOCAL_USER)
        done, cursor = await asyncio.wait_for(waiting, 5.0)
        assert (done, cursor) == ([], 1)

    run(tmp_path, scenario)
