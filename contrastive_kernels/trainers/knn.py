"""Evaluation of frozen encoder features: weighted kNN (the MoCo / InstDisc monitor) and an
optional linear probe."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def encode(encoder, images, batch_size=512):
    """L2-normalised features of already prepared images, in eval mode, in batches."""
    was_training = encoder.training
    encoder.eval()
    features = torch.cat([encoder(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return F.normalize(features, dim=1)


@torch.no_grad()
def knn_top1(bank, bank_labels, queries, query_labels, k=20, temperature=0.1):
    """Weighted kNN top-1 accuracy (a fraction): each query's k most similar bank features vote
    for their class with weight exp(similarity / temperature), as in the InstDisc / MoCo kNN
    monitor. Features must be L2-normalised."""
    k = min(k, len(bank))
    classes = int(bank_labels.max()) + 1
    correct = 0
    for i in range(0, len(queries), 1024):  # 1024 x len(bank) similarities at a time
        similarity, index = (queries[i:i + 1024] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(index), classes, device=bank.device, dtype=similarity.dtype)
        # exp((s - s_max) / T): the same ranking as exp(s / T), without overflow at small T
        votes.scatter_add_(1, bank_labels[index], ((similarity - similarity[:, :1]) / temperature).exp())
        correct += (votes.argmax(1) == query_labels[i:i + 1024]).sum().item()
    return correct / len(queries)


def linear_probe_top1(train_features, train_labels, test_features, test_labels, steps=300, lr=0.1,
                      weight_decay=1e-4, seed=0):
    """Top-1 of a linear classifier trained on frozen features (full-batch Adam, fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    classes = int(train_labels.max()) + 1
    weight = (torch.randn(classes, train_features.shape[1], generator=generator) * 0.01).to(train_features.device)
    weight.requires_grad_(True)
    bias = torch.zeros(classes, device=train_features.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(train_features @ weight.T + bias, train_labels).backward()
            optimizer.step()
    with torch.no_grad():
        return ((test_features @ weight.T + bias).argmax(1) == test_labels).float().mean().item()
