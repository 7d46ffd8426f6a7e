"""Tutel's helloworld_custom_gate_expert on switchyard:
python -m switchyard.examples.helloworld_custom_gate_expert [--flags]

A gate and an expert network written as plain torch modules are handed to moe_layer through
gate_type={'type': 'custom', 'module': CustomGate, ...} and experts={'type': 'custom', 'module':
CustomExpert, ...}, with Tutel's calling conventions:

- the gate class is built as module(model_dim=, num_global_experts=, **the other gate_type
  keys) and must set `top_k`; forward(x [T, d]) returns the logits [T, E];
- the expert class is built as module(model_dim=, num_experts_per_device=, sharded_count=,
  **the other experts keys); forward(x [E, C, d], ctx) returns [E, C, d], where ctx is the
  layer (ctx.sharded_count).

Both run in Python with torch autograd, called back from the C++ pipeline, which still routes,
dispatches and combines. Same flags as Tutel's example; one process, CPU. Prints Tutel's line
`STEP-N: loss = L, step_time = S sec.` for each step.
"""

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from switchyard import moe as tutel_moe


class CustomGate(torch.nn.Module):
    """A bias-free linear router, `my_wg.weight` [E, d]."""

    def __init__(self, **options):
        super().__init__()
        for key, value in options.items():
            logging.info("CustomGate option %s = %r", key, value)
            if key in ("top_k", "model_dim", "num_global_experts"):
                setattr(self, key, value)
            else:
                raise ValueError(f"CustomGate: option '{key}' is not handled")
        self.my_wg = torch.nn.Linear(self.model_dim, self.num_global_experts, bias=False)

    def forward(self, x):
        return self.my_wg(x)


class CustomExpert(torch.nn.Module):
    """One square matrix per local expert, `W` [E, d, d], and an optional activation:
    y[e] = act(x[e] W[e])."""

    def __init__(self, **options):
        super().__init__()
        self.activ_type = None
        for key, value in options.items():
            logging.info("CustomExpert option %s = %r", key, value)
            if key in ("model_dim", "num_experts_per_device", "sharded_count"):
                setattr(self, key, value)
            elif key == "my_activ_type":
                self.activ_type = value
            else:
                raise ValueError(f"CustomExpert: option '{key}' is not handled")
        self.W = torch.nn.Parameter(
            torch.empty(self.num_experts_per_device, self.model_dim, self.model_dim))
        self.my_activation = F.relu if self.activ_type == "relu" else None
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.W.normal_(0, 0.001)

    def extra_repr(self):
        return "num_experts_per_device=%d, model_dim=%d, activation=%s" % (
            self.num_experts_per_device, self.model_dim, self.activ_type)

    def forward(self, x, ctx):
        if ctx.sharded_count > 1:
            raise NotImplementedError("CustomExpert: experts sharded over several devices "
                                      "(sharded_count > 1) are not implemented")
        y = torch.matmul(x, self.W)  # [E, C, d] x [E, d, d]
        if self.my_activation is not None:
            y = self.my_activation(y)
        return y


class FullyCustomExampleModel(torch.nn.Module):
    def __init__(self, model_dim, num_local_experts, top, a2a_ffn_overlap_degree=1):
        super().__init__()
        self._moe_layer = tutel_moe.moe_layer(
            gate_type={"type": "custom", "module": CustomGate, "top_k": top},
            experts={"type": "custom", "module": CustomExpert,
                     "num_experts_per_device": num_local_experts, "my_activ_type": "relu"},
            model_dim=model_dim,
            scan_expert_func=lambda name, param: setattr(param, "skip_allreduce", True),
            seeds=(1, 1, 1),
            a2a_ffn_overlap_degree=a2a_ffn_overlap_degree)

    def forward(self, x):
        return F.log_softmax(torch.sum(self._moe_layer(x), dim=2), dim=1)


def main(argv=None):
    """Runs the example; returns the model and the loss of each step (for the tests)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_tokens", type=int, default=512)
    p.add_argument("--model_dim", type=int, default=2048)
    p.add_argument("--num_local_experts", type=int, default=2)
    p.add_argument("--dtype", type=str, default="float32")
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--l_aux_wt", type=float, default=0.0)
    p.add_argument("--a2a_ffn_overlap_degree", type=int, default=1)
    p.add_argument("--num_steps", type=int, default=100)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--eval", default=False, action="store_true")
    p.add_argument("--lr", type=float, default=1e-5, help="SGD learning rate (Tutel's: 1e-5)")
    args = p.parse_args(argv)

    dtypes = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        p.error(f"unrecognized --dtype {args.dtype}: expected one of {', '.join(dtypes)}")
    if args.device != "cpu":
        p.error("this build of the switchyard binding runs on the CPU only: use --device cpu")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtypes[args.dtype])
    try:
        return _run(args)
    finally:
        torch.set_default_dtype(default_dtype)


def _run(args):
    model = FullyCustomExampleModel(args.model_dim, args.num_local_experts, args.top,
                                    args.a2a_ffn_overlap_degree)
    print(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    torch.manual_seed(0)
    x = torch.randn([args.batch_size, args.num_tokens, args.model_dim],
                    dtype=torch.float32).to(torch.get_default_dtype())
    y = torch.LongTensor(args.batch_size).random_(1)
    print("[Benchmark] world_size = 1, dtype = %s, model_dim = %s, samples = %s, "
          "num_local_experts = %s, topK = %s, a2a_ffn_overlap_degree = %s, device = `cpu`" %
          (args.dtype, args.model_dim, args.batch_size * args.num_tokens, args.num_local_experts,
           args.top, args.a2a_ffn_overlap_degree))

    losses = []
    average_time = 0.0
    for i in range(args.num_steps):
        t_start = time.perf_counter()
        if not args.eval:
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            if args.l_aux_wt:
                loss = loss + args.l_aux_wt * model._moe_layer.l_aux
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                loss = F.nll_loss(model(x), y)
        t_stop = time.perf_counter()
        losses.append(float(loss.data))
        print("STEP-%s: loss = %.5f, step_time = %.6f sec." % (i, losses[-1], t_stop - t_start),
              flush=True)
        if i + 10 >= args.num_steps:
            average_time += t_stop - t_start
    average_time /= min(10, args.num_steps) if args.num_steps else 1
    print("\n[Summary] Average synchronized step_time = %s sec." % average_time)
    return model, losses


if __name__ == "__main__":
    main()
