"""Runs a function on W spawned CPU processes joined in a Gloo process group.

run_ranks(world, fn, *args) returns [fn(rank, world, *args) for each rank]. A rank that raises
fails the caller with that rank's traceback; ranks that do not finish within `timeout` seconds
(a hang) are killed and fail it too. `fn` must be a module-level function (spawn pickles it by
name), and the children inherit this process's environment (TRITON_INTERPRET included).
"""
import os
import tempfile
import traceback

import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W processes share this machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: B036 (report anything, the parent decides)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(world, fn, *args, timeout=300):
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [context.Process(target=_entry, args=(rank, world, init_file, fn, args, results))
                 for rank in range(world)]
        for p in procs:
            p.start()
        outcomes = {}
        try:
            for _ in range(world):
                rank, status, value = results.get(timeout=timeout)
                outcomes[rank] = (status, value)
        except Exception:  # queue.Empty: some rank never reported
            missing = sorted(set(range(world)) - set(outcomes))
            raise AssertionError(f"ranks {missing} of {world} did not finish within {timeout} s (a hang?); "
                                 f"others: {outcomes}") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(outcomes.items()) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [outcomes[rank][1] for rank in range(world)]
