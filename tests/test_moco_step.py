"""A whole MoCo step on the GPU (momentum update, keys, InfoNCE against the KeyQueue, backward,
enqueue) captured in one CUDA graph: capture fails on any host sync, and replays must equal
the same steps run eagerly."""
import copy

import pytest
import torch
import torch.nn.functional as F

from contrastive_kernels import KeyQueue, flatten_parameters, fused_infonce, momentum_update


def make_setup():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).cuda()
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        target[0].weight.mul_(0.5)  # so that the EMA visibly moves the target
    flats = flatten_parameters(target), flatten_parameters(online)
    queue = KeyQueue(256, 32, device="cuda")
    inputs = torch.randn(24, 48, device="cuda"), torch.randn(24, 48, device="cuda")
    return online, target, flats, queue, inputs


def moco_step(online, target, flats, queue, inputs):
    x_q, x_k = inputs
    with torch.no_grad():
        momentum_update(flats[0], flats[1], 0.99)
        k = F.normalize(target(x_k), dim=1)
    loss = fused_infonce(online(x_q), k, queue, 0.2)
    loss.backward()
    queue.enqueue(k)
    return loss.detach()


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_of_a_moco_step():
    eager = make_setup()
    graphed = make_setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compilation, allocator) outside the graph
        eager_losses = [moco_step(*eager) for _ in range(3)]
        warm_losses = [moco_step(*graphed) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = moco_step(*graphed)
    for _ in range(20):  # 23 steps in all: the 256-row queue wraps around
        graph.replay()
        eager_losses.append(moco_step(*eager))
        warm_losses.append(static_loss.clone())
    torch.cuda.synchronize()
    torch.testing.assert_close(torch.stack(warm_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed[3].buffer, eager[3].buffer, rtol=1e-5, atol=1e-6)
    assert int(graphed[3].head) == int(eager[3].head) == (23 * 24) % 256
    for p_graph, p_eager in zip(graphed[1].parameters(), eager[1].parameters()):
        torch.testing.assert_close(p_graph, p_eager, rtol=1e-5, atol=1e-6)
