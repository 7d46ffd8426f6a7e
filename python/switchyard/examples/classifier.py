"""A small MoE classifier on a synthetic dataset: python -m switchyard.examples.classifier

The data: num_classes * clusters_per_class Gaussian clusters in a low-dimensional space, each
labelled with a class at random, so every class is a union of clusters scattered among the
others' and no linear classifier separates them (--no_moe trains the same model without its MoE
layer, a linear classifier, for comparison). The model: a linear embedding, one MoE layer (top-2
of 8 experts) with a residual connection, a linear head, trained with Adam on cross-entropy plus
the balancing loss. The test accuracy is printed after each epoch and rises far above chance
(1 / num_classes).
"""

import argparse

import torch
import torch.nn.functional as F

from switchyard import moe


def make_data(n, num_classes, dim, clusters_per_class, seed):
    """n points (x [n, dim], labels [n]); the clusters are the same for every seed."""
    clusters = num_classes * clusters_per_class
    g_clusters = torch.Generator().manual_seed(7)
    centers = torch.randn(clusters, dim, generator=g_clusters) * 2.0
    label_of = torch.randperm(clusters, generator=g_clusters) % num_classes  # [clusters]
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, clusters, (n,), generator=g)
    x = centers[which] + 0.35 * torch.randn(n, dim, generator=g)
    return x, label_of[which]


class Classifier(torch.nn.Module):
    def __init__(self, dim, model_dim, num_classes, num_experts, top, use_moe=True):
        super().__init__()
        self.embed = torch.nn.Linear(dim, model_dim)
        self.moe = None if not use_moe else moe.moe_layer(
            gate_type={"type": "top", "k": top, "capacity_factor": 0.0},
            model_dim=model_dim,
            experts={"type": "ffn", "num_experts_per_device": num_experts,
                     "hidden_size_per_expert": 2 * model_dim, "activation_fn": "gelu"},
            seeds=(1, 1, 1))
        self.head = torch.nn.Linear(model_dim, num_classes)

    def forward(self, x):
        h = self.embed(x)
        if self.moe is None:
            return self.head(h), torch.zeros(())
        h = h + self.moe(h)
        return self.head(h), self.moe.l_aux


def main(argv=None):
    """Runs the example; returns the test accuracy after each epoch (for the tests)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_classes", type=int, default=5)
    p.add_argument("--clusters_per_class", type=int, default=4)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--model_dim", type=int, default=32)
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--train_size", type=int, default=4000)
    p.add_argument("--test_size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--l_aux_wt", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_moe", default=False, action="store_true",
                   help="leave the MoE layer out (a linear classifier)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr = make_data(args.train_size, args.num_classes, args.dim, args.clusters_per_class,
                         seed=1)
    xte, yte = make_data(args.test_size, args.num_classes, args.dim, args.clusters_per_class,
                         seed=2)
    model = Classifier(args.dim, args.model_dim, args.num_classes, args.num_experts, args.top,
                       use_moe=not args.no_moe)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (model(xte)[0].argmax(1) == yte).float().mean().item()
        model.train()
        return acc

    print("chance = %.3f, test accuracy before training = %.3f" %
          (1.0 / args.num_classes, accuracy()))
    accuracies = []
    for epoch in range(args.epochs):
        perm = torch.randperm(args.train_size)
        total = 0.0
        for i in range(0, args.train_size, args.batch_size):
            idx = perm[i:i + args.batch_size]
            logits, l_aux = model(xtr[idx])
            loss = F.cross_entropy(logits, ytr[idx]) + args.l_aux_wt * l_aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        accuracies.append(accuracy())
        print("epoch %d: train loss = %.4f, test accuracy = %.3f" %
              (epoch + 1, total / args.train_size, accuracies[-1]), flush=True)
    return accuracies


if __name__ == "__main__":
    main()
