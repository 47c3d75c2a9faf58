"""A worked example of --optimizer_file: plain AdamW for every parameter (docs/recipes.md#bring-your-own-optimizer).

    python train_gpt.py --preset=smoke_optimization_track --optimizer_file=docs/optimizer_adamw.py
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset=optimization_track \
        --optimizer_file=docs/optimizer_adamw.py --adam_lr=0.003

The trainer calls build_optimizers(groups, args, rank, world_size) once, after building the model:
  - groups: every trainable parameter exactly once, as {row: [(name, parameter), ...]}. Under the optimization track
    the rows are "matrices" (the blocks' Q/K/V/O, c_fc and c_proj: what the baseline gives Muon), "embed", "lm_head",
    "biases" (the blocks' and the head's) and "norms" (the RMSNorm gains).
  - args: the run's Hyperparameters; read any setting you like (here adam_lr, adam_eps, adam_weight_decay), so a
    sweep is a command-line flag, not an edit.
  - it returns a list of optimizers. Each has step(plan), called once per training step after every micro-batch's
    backward, and a `state` attribute that checkpoints save (torch.save of it) and --resume assigns back.
At step(plan), p.grad holds the gradient summed over this rank's windows (not averaged, not reduced across ranks):
all-reduce it when world_size > 1 and scale it by 1 / args.windows_per_step for the mean over the 8 windows of the
step. plan.lr is the schedule's learning-rate multiplier for this step (constant, then a linear decay to 0 over the
last 70% under the track); plan.step is the step, plan.muon_momentum the momentum schedule. Set every p.grad to None
when done. Sharding work across ranks is yours to choose: this example does the same update on every rank.
"""

import torch
import torch.distributed as dist


class AdamW:
    def __init__(self, params: list[torch.nn.Parameter], args, world_size: int):
        self.params, self.world_size, self.lr = params, world_size, args.adam_lr
        self.grad_scale = 1 / args.windows_per_step  # the summed gradients of the step's windows -> their mean
        self.opt = torch.optim.AdamW(params, lr=args.adam_lr, betas=(0.9, 0.95), eps=args.adam_eps,
                                     weight_decay=args.adam_weight_decay)

    @property
    def state(self) -> dict:  # what a checkpoint keeps: torch's state_dict (tensors, numbers, no parameter objects)
        return self.opt.state_dict()

    @state.setter
    def state(self, value: dict):
        self.opt.load_state_dict(value)

    @torch.no_grad()
    def step(self, plan):
        for p in self.params:
            if p.grad is not None:
                if self.world_size > 1:
                    dist.all_reduce(p.grad)
                p.grad.mul_(self.grad_scale)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * plan.lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def build_optimizers(groups: dict, args, rank: int, world_size: int) -> list:
    return [AdamW([p for rows in groups.values() for _, p in rows], args, world_size)]
