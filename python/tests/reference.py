"""A pure-PyTorch MoE layer with Tutel's routing (ROUTING.md), written for clarity: loops over
choices and tokens, autograd for the gradients. Used only by the tests."""

import math

import torch
import torch.nn.functional as F


def capacity(T, E, k, cf, needed):
    spe = math.ceil(T / E) if T else 0
    if cf > 0:
        return max(k * int(math.floor(cf * spe)), 1)
    most = int(needed.max()) if T else 0
    if cf == 0:
        return most
    return min(most, k * int(math.floor(-cf * spe)))


def reference_moe(x, wg, w1, w2, b1=None, b2=None, k=2, cf=1.0, bpr=False, normalize=True,
                  postscore=True, act=F.relu, logits=None):
    """x [T, d], wg [E, d], w1 [E, h, d], w2 [E, h, o], b1 [E, h], b2 [E, o] (o: the experts'
    output width). Returns (y [T, o], l_aux, info) with gradients through autograd."""
    T, d = x.shape
    o_dim = w2.shape[2]
    E = w1.shape[0]
    k = min(k, E)
    if logits is None:
        logits = x @ wg.t()
    scores = F.softmax(logits, dim=1)
    idx = torch.topk(scores.detach(), k, dim=1).indices  # [T, k]
    w = scores.gather(1, idx)
    if normalize and k > 1:
        w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)

    if bpr:
        order = torch.sort(-scores.detach().max(dim=1).values, stable=True).indices.tolist()
    else:
        order = list(range(T))
    slot = torch.zeros(T, k, dtype=torch.long)
    before = torch.zeros(E, dtype=torch.long)
    for j in range(k):
        running = torch.zeros(E, dtype=torch.long)
        for t in order:
            e = int(idx[t, j])
            slot[t, j] = running[e] + before[e]
            running[e] += 1
        before += running
    C = capacity(T, E, k, cf, before)

    ys = []
    for t in range(T):
        acc = torch.zeros(o_dim, dtype=x.dtype)
        for j in range(k):
            if slot[t, j] >= C:
                continue
            e = int(idx[t, j])
            inp = x[t] if postscore else x[t] * w[t, j]
            h = w1[e] @ inp
            if b1 is not None:
                h = h + b1[e]
            o = act(h) @ w2[e]
            if b2 is not None:
                o = o + b2[e]
            acc = acc + (w[t, j] * o if postscore else o)
        ys.append(acc)
    y = torch.stack(ys) if T else x.new_zeros(0, o_dim)

    first = torch.zeros(E, dtype=x.dtype)
    for t in range(T):
        first[int(idx[t, 0])] += 1
    l_aux = (E / (T * T)) * (scores.sum(dim=0) * first).sum()
    kept = int((slot < C).sum())
    return y, l_aux, {"capacity": C, "kept": kept, "idx": idx}
