"""RQ, a Python job queue, through the Redis splicer in front of one server: its worker needs
INFO (the server version), CLIENT INFO (its address), SUBSCRIBE (its command channel), WATCH
(jobs that depend on others) and MULTI/EXEC; twemproxy refuses all of these. (In front of
several servers RQ's transactions span keys of several servers, which the splicer refuses.)"""
from __future__ import annotations

import pytest

from .redis_fixtures import needs_redis, redis_servers, splicer

rq = pytest.importorskip("rq", reason="rq is a test dependency (pip install -e '.[dev]')")

pytestmark = [needs_redis, pytest.mark.timeout(120)]


@pytest.mark.parametrize("protocol", [2, 3])
def test_an_rq_worker_runs_jobs_and_their_dependents(tmp_path, protocol: int) -> None:
    with redis_servers(tmp_path, 1) as one:
        with splicer(one) as s:
            r = s.client(protocol=protocol)
            q = rq.Queue("default", connection=r)
            first = q.enqueue("operator.add", 2, 3)
            second = q.enqueue("operator.mul", 4, 5, depends_on=first)  # parked until `first` is done
            assert second.get_status() == rq.job.JobStatus.DEFERRED
            worker = rq.SimpleWorker([q], connection=r)
            assert worker.work(burst=True)
            first.refresh()
            second.refresh()
            assert (first.get_status(), first.return_value()) == (rq.job.JobStatus.FINISHED, 5)
            assert (second.get_status(), second.return_value()) == (rq.job.JobStatus.FINISHED, 20)
            # The jobs ran on the server behind the splicer.
            assert one[0].client().exists(f"rq:job:{first.id}")
