"""Plot workers draw the same bytes as the run's own process, and never lose a figure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lens import plotpool
from lens.config import RunConfig
from lens.plotpool import PlotPool, draw_beside_decode, workers_for
from lens.plots import draw_in_process, plot_jobs
from lens.probe import load_probe
from lens.report import analyse

TINY_PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


@pytest.fixture(scope="module")
def jobs(tiny_models):
    run = analyse(tiny_models["tiny-llama"], load_probe(TINY_PROBE), RunConfig(dtype="float64"))
    return plot_jobs(run)


def test_a_pool_draws_every_figure_byte_for_byte_as_in_process(jobs):
    assert len(jobs) >= 3  # a heatmap per fact and the trajectories
    want = draw_in_process(jobs)
    with PlotPool(2) as pool:
        assert pool.size == 2
        got = pool.draw(jobs)
    assert list(got) == [job.file for job in jobs]
    assert got == want


def test_figures_a_dead_worker_owed_are_drawn_in_process(jobs):
    want = draw_in_process(jobs)
    with PlotPool(2) as pool:
        victim = pool._procs[0]
        victim.kill()
        victim.wait()
        assert pool.draw(jobs) == want


def test_a_pool_without_workers_draws_in_process(jobs):
    with PlotPool(0) as pool:
        assert pool.size == 0
        assert pool.draw(jobs) == draw_in_process(jobs)


def test_closing_ends_every_worker(jobs):
    pool = PlotPool(2)
    procs = list(pool._procs)
    pool.draw(jobs[:1])
    pool.close()
    assert all(p.poll() is not None for p in procs)


def test_workers_for_counts_jobs_and_cores():
    assert workers_for(0) == 0
    assert workers_for(1) == 1
    assert 1 <= workers_for(100) <= 4


def test_heatmaps_are_drawn_beside_the_decode_only_where_it_leaves_a_core_idle(monkeypatch):
    monkeypatch.setattr(plotpool, "cores", lambda: 2)
    assert not draw_beside_decode("cpu", 2)  # every core decodes: drawn at write time
    assert not draw_beside_decode("cpu", 4)
    assert draw_beside_decode("cpu", 1)
    assert draw_beside_decode("cuda", 2)  # the decode runs on the GPU
    assert draw_beside_decode("mps", 8)


def test_cores_is_what_this_process_may_run_on():
    assert 1 <= plotpool.cores() <= (os.cpu_count() or 1)


def _plot_workers_of(tmp: Path) -> list[int]:
    """Live ``lens.plotpool`` processes started by a fault case under ``tmp`` (by environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"lens.plotpool" in cmd and str(tmp).encode() in env:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("quiet", [False, True])
def test_sigterm_mid_run_with_plots_ends_cleanly(tmp_path, quiet):
    """A run with plots on (so with plot workers) interrupted mid-analysis: exit 143, only
    its failure record, no traceback, and no plot worker outlives it."""
    import signal

    import faults_lifecycle as life
    from faultkit import TINY

    run = life.cli(tmp_path, [TINY], quiet=quiet, hook="analyse", signum=signal.SIGTERM,
                   plots=True)
    assert run.status == 143, run.err
    name = Path(TINY).name
    assert sorted(p.name for p in run.out.iterdir()) == [f"output-{name}.error.json"]
    assert "lens: interrupted" in run.err and "Traceback" not in run.err
    assert _plot_workers_of(tmp_path) == []


def test_figures_submitted_early_come_back_from_draw_without_drawing_again(jobs):
    """``submit`` starts a figure at once (a fact's heatmap as its passes finish);
    ``draw`` then collects it with the rest, the same bytes, each figure drawn once."""
    want = draw_in_process(jobs)
    with PlotPool(2) as pool:
        pool.submit(jobs[:2])
        pool.submit(jobs[:1])  # again: still one drawing
        assert len(pool._owed) + len(pool._drawn) == 2
        got = pool.draw(jobs)
        assert not pool._owed and not pool._drawn
    assert list(got) == [job.file for job in jobs]
    assert got == want


def test_a_run_submits_each_heatmap_as_its_fact_finishes(tiny_models):
    """``analyse`` hands each fact's passes to ``fact_done`` in probe order as soon as
    they are done; the heatmap job made from them is the one ``plot_jobs`` makes."""
    from lens.plots import heatmap_job

    model = tiny_models["tiny-llama"]
    probe = load_probe(TINY_PROBE)
    seen: list[tuple[str, int]] = []
    early = {}

    def done(fact, passes):  # type: ignore[no-untyped-def]
        seen.append((fact.id, len(passes)))
        early[fact.id] = heatmap_job(model, fact.id, passes, multi=True)

    run = analyse(model, probe, RunConfig(dtype="float64", batch_size=2), fact_done=done)
    assert [fid for fid, _ in seen] == [f.id for f in probe.facts]
    assert all(n == len(fr.passes) for (_, n), fr in zip(seen, run.facts, strict=True))
    heatmaps = [j for j in plot_jobs(run) if j.kind == "heatmap"]
    assert heatmaps == [early[f.id] for f in probe.facts]


def test_figures_submitted_first_are_drawn_before_those_queued(jobs, monkeypatch):
    """One worker, busy: a ``first`` job submitted after others is taken before those
    still queued (the trajectories at write time, ahead of queued heatmaps)."""
    import lens.plotpool

    sent = []
    send = lens.plotpool._send

    def spy(stream, batch):  # type: ignore[no-untyped-def]
        sent.extend(job.file for job in batch)
        send(stream, batch)

    monkeypatch.setattr(lens.plotpool, "_send", spy)
    files = [job.file for job in jobs]
    with PlotPool(1) as pool:
        pool.submit(jobs[:2])
        pool.submit(jobs[2:], first=True)
        got = pool.draw(jobs)
    assert got == draw_in_process(jobs)
    # the worker took the first job at once, or only after the second submit
    assert sent in ([files[0], *files[2:], files[1]], [*files[2:], *files[:2]])


def test_figures_of_workers_that_all_died_are_drawn_in_process(jobs):
    want = draw_in_process(jobs)
    with PlotPool(2) as pool:
        for proc in pool._procs:
            proc.kill()
            proc.wait()
        assert pool.draw(jobs) == want
        assert not pool._owed


def test_roles_give_the_trajectories_one_worker_and_the_heatmaps_the_rest():
    from lens.plotpool import roles

    assert roles(0) == []
    assert roles(1) == [("trajectories", "heatmap")]
    assert roles(3) == [("trajectories",), ("heatmap",), ("heatmap",)]


def test_each_figure_goes_to_the_worker_that_prepared_for_it(jobs, monkeypatch):
    """Told the heatmap shapes (``prepare``), two workers draw a heatmap and the
    trajectories submitted together: each takes the kind it prepared for, whatever the
    order, and the bytes are those drawn in process."""
    import lens.plotpool
    from lens.plotprep import prepare_for

    heatmap = next(job for job in jobs if job.kind == "heatmap")
    trajectories = next(job for job in jobs if job.kind == "trajectories")
    want = draw_in_process([heatmap, trajectories])
    sent: list[tuple[int, str]] = []
    send = lens.plotpool._send

    for order in ([heatmap, trajectories], [trajectories, heatmap]):
        with PlotPool(2) as pool:
            def spy(stream, message, pool=pool):  # type: ignore[no-untyped-def]
                if isinstance(message, list):
                    worker = [p.stdin for p in pool._procs].index(stream)
                    sent.extend((worker, job.kind) for job in message)
                send(stream, message)

            monkeypatch.setattr(lens.plotpool, "_send", spy)
            shapes = [1 + max(r.pos for r in heatmap.records)]
            pool.prepare(prepare_for(heatmap.n_layers, shapes))
            pool.submit(order, first=True)
            assert pool.draw(order) == {job.file: want[job.file] for job in order}
        assert sorted(sent) == [(0, "trajectories"), (1, "heatmap")]
        sent.clear()


def test_waiting_sees_input_and_its_end_on_a_pipe():
    from lens.plotpool import _waiting

    read, write = os.pipe()
    with open(read, "rb", buffering=0) as stream:
        assert not _waiting(stream)
        os.write(write, b"x")
        assert _waiting(stream)
        assert stream.read(1) == b"x"
        assert not _waiting(stream)
        os.close(write)
        assert _waiting(stream)  # end of input: the worker reads it and exits
        assert stream.read(1) == b""
