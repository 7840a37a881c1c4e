"""The seed walkthrough (../shared/seed/parameter_management.md), cell by cell, run twice: on
local torch modules and on served ones, where only the lines that create `net`/`rgnet` differ.

Each cell's printed output and displayed value (the repr of a final expression, as a notebook
shows it) must be equal. nn.init on a served parameter draws from the client's generator (its
state travels with ApplyInit, see test_client_seeded_inits.py), so seeding it identically before
a cell in both runs makes even the random cells (normal_, xavier_uniform_, uniform_) equal bit
for bit; distribution checks are made as well.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import paramhub

# (cell label, code). MAKE(...) marks the only lines that differ between the runs: locally it
# builds the module after torch.manual_seed(0); remotely it serves a copy of that module.
CELLS = [
    ("In[50]", """
        import torch
        import torch.nn as nn
        net = MAKE("mlp", lambda: nn.Sequential(nn.Linear(4,8),nn.ReLU(),nn.Linear(8,1)))
        X = torch.rand(size = (2,4))
        net(X)
    """),
    ("In[8]", "print(net[0].state_dict())"),
    ("In[10]", "print(net[2].state_dict())"),
    ("In[13]", """
        print(type(net[2].bias))
        print(net[2].bias)
        print(net[2].bias.data)
    """),
    ("In[14]", "net[2].weight.grad == None"),
    ("In[22]", """
        print(*[(name,param.shape) for name,param in net[0].named_parameters()])
        print(*[(name,param.shape) for name ,param in net.named_parameters()])
    """),
    ("In[23]", "net.state_dict()['2.bias'].data"),
    ("In[28]", """
        def block1():
          return nn.Sequential(nn.Linear(4,8),nn.ReLU(),nn.Linear(8,4),nn.ReLU())

        def block2():
          net = nn.Sequential()
          for i in range(4):
            net.add_module(f'block{i}',block1())
          return net

        rgnet = MAKE("rgnet", lambda: nn.Sequential(block2(),nn.Linear(4,1)))
        rgnet(X)
    """),
    ("In[29]", "print(rgnet)"),
    ("In[30]", "rgnet[0][1][0].bias.data"),
    ("In[34]", """
        def init_normal(m):
          if type(m) == nn.Linear:
            nn.init.normal_(m.weight,mean= 0 ,std=0.01)
            nn.init.zeros_(m.bias)
        net.apply(init_normal)
        net[0].weight.data,net[0].bias.data[0]
    """),
    ("In[36]", """
        def init_constant(m):#m for model
          if type(m) == nn.Linear:
            nn.init.constant_(m.weight,1)
            nn.init.zeros_(m.bias)
        net.apply(init_constant)
        net[0].weight.data,net[0].bias.data
    """),
    ("In[40]", """
        def xavier(m):
          if type(m) == nn.Linear:
            nn.init.xavier_uniform_(m.weight)
        def init_42(m):
          if type(m) == nn.Linear:
            nn.init.constant_(m.weight,42)
        net[0].apply(xavier)
        net[2].apply(init_42)

        print(net[0].weight.data)
        print(net[2].weight.data)
    """),
    ("In[46]", """
        def my_init(m):
          if type(m)==nn.Linear:
            print("Init",*[(name,param.shape) for name,param in m.named_parameters()][0])
            nn.init.uniform_(m.weight,-10,10)
            m.weight.data *= m.weight.data.abs() >=5
        net.apply(my_init)
        net[0].weight
    """),
    ("In[48]", """
        net[0].weight.data[:] +=1
        net[0].weight.data[0,0] = 42
        net[0].weight.data
    """),
    ("In[51]", """
        # We need to give the shared layer a name so that we can refer to its
        # parameters
        def shared_net():
            shared = nn.Linear(8, 8)
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared,
                                 nn.ReLU(), nn.Linear(8, 1))
        net = MAKE("shared", shared_net)
        net(X)
        # Check whether the parameters are the same
        print(net[2].weight.data[0] == net[4].weight.data[0])
        net[2].weight.data[0, 0] = 100
        # Make sure that they are actually the same object rather than just having the
        # same value
        print(net[2].weight.data[0] == net[4].weight.data[0])
    """),
]

# Local torch prints grad_fn on outputs of modules whose parameters require grad; Forward on
# the server returns plain tensors (remote autograd is a separate feature), so the suffix is
# the one part of a printed Forward output that is not compared.
_GRAD_FN = re.compile(r", grad_fn=<\w+>")


def run_cell(code: str, ns: dict) -> tuple[str, object]:
    """Runs a cell like a notebook: returns (stdout, value of a final expression or None)."""
    tree = ast.parse(textwrap.dedent(code))
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    out = io.StringIO()
    value = None
    with contextlib.redirect_stdout(out):
        exec(compile(tree, "<cell>", "exec"), ns)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
    return out.getvalue(), value


def shown(stdout: str, value: object) -> str:
    text = stdout + ("" if value is None else repr(value) + "\n")
    return _GRAD_FN.sub("", text)


def tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        t = value.fetch() if paramhub.tensor.is_remote_tensor(value) else value
        return [t.detach()]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def test_seed_walkthrough_matches_local_torch(client: paramhub.Client, target: str,
                                              tmp_path) -> None:
    def make_local(name, build):
        torch.manual_seed(0)
        return build()

    def make_remote(name, build):
        torch.manual_seed(0)
        return client.create_model(name, build())

    local_ns = {"MAKE": make_local}
    remote_ns = {"MAKE": make_remote}
    rpcs: dict[str, int] = {}
    for label, code in CELLS:
        torch.manual_seed(1234)
        local_out, local_val = run_cell(code, local_ns)
        torch.manual_seed(1234)
        before = sum(client.rpc_counts.values())
        remote_out, remote_val = run_cell(code, remote_ns)
        remote_text = shown(remote_out, remote_val)  # displaying the value is part of the cell
        rpcs[label] = sum(client.rpc_counts.values()) - before
        assert remote_text == shown(local_out, local_val), label
        for a, b in zip(tensors_in(remote_val), tensors_in(local_val), strict=True):
            assert torch.equal(a, b), label

    # Distribution checks that hold whatever generator the server draws from.
    net, X = remote_ns["net"], remote_ns["X"]
    mlp = client.model("mlp")
    w = mlp[0].weight.fetch()
    assert w[0, 0].item() == 42.0
    nonzero = w[1:][(w[1:] != 0) & (w[1:] != 1)] - 1  # cell 48 added 1 after masking
    assert (nonzero.abs() >= 5 - 1e-6).all() and (nonzero.abs() <= 10).all()
    assert torch.equal(net[2].weight.fetch()[0], net[4].weight.fetch()[0])

    # No cell makes one RPC per element: the largest cell touches 32 elements per tensor.
    assert max(rpcs.values()) <= 12, rpcs
    # Record the measurement for the README (printed with -s; written next to the test run).
    (tmp_path / "rpcs.json").write_text(json.dumps(rpcs))
    print("walkthrough RPCs per cell:", rpcs, "total:", sum(rpcs.values()), dict(client.rpc_counts))

    # A second process attached with client.model(name) sees the walkthrough's writes.
    out_file = tmp_path / "seen.safetensors"
    script = textwrap.dedent(f"""
        import paramhub
        from safetensors.torch import save_file
        with paramhub.connect({target!r}) as c:
            mlp, shared = c.model("mlp"), c.model("shared")
            save_file({{"mlp.0.weight": mlp[0].weight.fetch(),
                       "shared.2.weight": shared[2].weight.fetch(),
                       "shared.4.weight": shared[4].weight.fetch()}}, {str(out_file)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    seen = load_file(str(out_file))
    local_net = local_ns["net"]  # the shared net of cell 51 replaced `net` locally
    assert torch.equal(seen["mlp.0.weight"], w)
    assert seen["shared.2.weight"][0, 0].item() == 100.0
    assert torch.equal(seen["shared.2.weight"], local_net[2].weight.detach())
    assert torch.equal(seen["shared.4.weight"], local_net[4].weight.detach())


def test_seed_walkthrough_rgnet_indexing_makes_no_rpc(client: paramhub.Client) -> None:
    """Printing, indexing and listing a mirror use cached structure only."""
    net = client.create_model("mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    before = sum(client.rpc_counts.values())
    text = repr(net)
    _ = net[0], net[0:2], list(net.named_parameters()), list(net.named_modules())
    _ = [p.shape for p in net.parameters()], net[2].weight.dtype, net[2].weight.device
    assert sum(client.rpc_counts.values()) == before
    assert text == repr(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))


@pytest.mark.parametrize("seed", [0, 7])
def test_create_model_meta_with_seed_matches_local(client: paramhub.Client, seed: int) -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    net = client.create_model("mlp", meta, seed=seed)
    torch.manual_seed(seed)
    local = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    for (n, p), (ln, lp) in zip(net.named_parameters(), local.named_parameters(), strict=True):
        assert n == ln and torch.equal(p.fetch(), lp.detach())
