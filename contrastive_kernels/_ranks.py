"""Runs a function on W local CPU processes joined in a Gloo process group: the launcher of the
distributed tests and of the distributed benchmark.

run_ranks(world, fn, *args) returns [fn(rank, world, *args) for each rank]. A rank that raises
makes it raise with every failed rank's traceback: the others, which may be stuck in a
collective, get ERROR_GRACE_S seconds to report the errors it caused, then are killed. Ranks
that do not finish within `timeout` seconds (a hang) are killed and it raises too. `fn` must be
a module-level function (spawn pickles it by name), and the children inherit this process's
environment (TRITON_INTERPRET included).
"""
import os
import tempfile
import traceback

import torch.multiprocessing as mp


ERROR_GRACE_S = 10  # after a rank's error, how long to wait for the errors it causes elsewhere


def _entry(rank, world, init_file, threads, fn, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # W processes share this machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            outcome = (rank, "ok", fn(rank, world, *args))
        except BaseException:  # noqa: B036 (report anything, the parent decides)
            outcome = (rank, "error", traceback.format_exc())
        # Reported before the group goes: its teardown breaks the other ranks' collectives.
        results.put(outcome)
        dist.destroy_process_group()
    except BaseException:  # noqa: B036
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world, fn, *args, threads=1, timeout=300):
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [context.Process(target=_entry, args=(rank, world, init_file, threads, fn, args, results))
                 for rank in range(world)]
        for p in procs:
            p.start()
        outcomes = {}
        try:
            while len(outcomes) < world:
                failed = any(status == "error" for status, _ in outcomes.values())
                rank, status, value = results.get(timeout=ERROR_GRACE_S if failed else timeout)
                outcomes[rank] = (status, value)
        except Exception:  # queue.Empty: some rank never reported
            missing = sorted(set(range(world)) - set(outcomes))
            if not any(status == "error" for status, _ in outcomes.values()):
                raise RuntimeError(f"ranks {missing} of {world} did not finish within {timeout} s (a hang?); "
                                   f"others: {outcomes}") from None
        finally:
            for p in procs:
                p.join(timeout=30 if len(outcomes) == world else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(outcomes.items()) if status == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [outcomes[rank][1] for rank in range(world)]
