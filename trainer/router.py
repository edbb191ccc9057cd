"""Training a fusion's learned router: one small gate per LoRA layer that tells the members apart.

The gate of a layer scores each member from the layer's input, `x·rowᵢ + biasᵢ`, the same
way the server's `learned` router does (plait.server.adapters.routers). It is trained as a
classifier: every token of an example from member i's data should score member i highest.
It learns from the hidden states of the bare NF4 base the server runs, not of the base with
member i's adapter on: those carry the adapter's own signature, which a gate learns to read
instead of the prompt (seen: it then routed a whole request by whichever member won the
first layers). On the bare base, tokens every skill shares (the chat template's preamble)
look the same for every member and are learnt as a tie, as they should be. The base stays
frozen; only the gates learn, from inputs captured by forward pre-hooks, so no gradient
flows through the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterExample:
    member: int  # index of the member whose data it is
    input_ids: list[int]


class Gates(torch.nn.Module):
    """One gate per module path; members that do not adapt a module are masked out there."""

    def __init__(self, inputs: Mapping[str, int], present: Mapping[str, Sequence[bool]]):
        super().__init__()
        self.paths = list(inputs)
        self.weight = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(len(present[p]), inputs[p])) for p in self.paths
        )
        self.bias = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(len(present[p]))) for p in self.paths)
        self.present = {p: torch.tensor(present[p]) for p in self.paths}

    def scores(self, index: int, x: torch.Tensor) -> torch.Tensor:
        path = self.paths[index]
        logits = x @ self.weight[index].t() + self.bias[index]
        return logits.masked_fill(~self.present[path].to(x.device), float("-inf"))

    def state(self) -> dict[str, torch.Tensor]:
        """The server's file layout: `<module>.weight` [members, in] and `<module>.bias` [members]."""
        out = {}
        for i, path in enumerate(self.paths):
            out[f"{path}.weight"] = self.weight[i].detach().float().cpu().contiguous()
            out[f"{path}.bias"] = self.bias[i].detach().float().cpu().contiguous()
        return out


def train_router(
    model,
    gates: Gates,
    examples: Sequence[RouterExample],
    epochs: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, int, float], None] = lambda step, total, loss: None,
) -> float:
    """Train `gates` on `examples` with `model` (the base causal LM); returns the share of
    (token, layer) pairs routed to the right member in the last epoch."""
    device = next(gates.parameters()).device
    modules = {path: model.get_submodule(path) for path in gates.paths}
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    captured: list[tuple[int, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, i=i: captured.append((i, args[0].detach())))
        for i, module in enumerate(modules.values())
    ]
    order = list(examples)
    rng = random.Random(seed)
    total, step, right, seen = epochs * len(order), 0, 0, 0
    try:
        for epoch in range(epochs):
            rng.shuffle(order)
            for example in order:
                captured.clear()
                with torch.no_grad():
                    model(input_ids=torch.tensor([example.input_ids], device=device))
                losses = []
                for i, x in captured:
                    if not gates.present[gates.paths[i]][example.member]:
                        continue  # the member does not adapt this layer: nothing to learn here
                    scores = gates.scores(i, x.reshape(-1, x.shape[-1]).float())
                    label = torch.full((scores.shape[0],), example.member, device=device)
                    losses.append(F.cross_entropy(scores, label))
                    if epoch == epochs - 1:
                        right += int((scores.argmax(dim=1) == label).sum())
                        seen += scores.shape[0]
                loss = torch.stack(losses).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                on_step(step, total, loss.detach().item())
    finally:
        for hook in hooks:
            hook.remove()
    return right / seen if seen else 0.0


def save_router(gates: Gates, path: Path) -> None:
    import safetensors.torch

    tmp = path.with_suffix(".partial")
    safetensors.torch.save_file(gates.state(), tmp)
    tmp.replace(path)
