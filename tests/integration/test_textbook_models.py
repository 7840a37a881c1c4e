"""Textbook coverage: notebook cells in the style of a current PyTorch textbook's "builders'
guide" (layers and modules, parameter management and initialization, lazy initialization,
custom layers, file I/O), run on local torch and against `paramhub serve --trust-remote-code`
in a subprocess, where the only difference is that MAKE(...) serves the module it builds.

Every cell's printed output and displayed value must be equal, seeded random initializations
included: the served lazy layers materialize, and nn.init draws, from this process's generator
state (the server is another process, so nothing else could make them equal). The grad_fn
suffix of printed Forward outputs is the one part not compared (the served call's autograd node
is RemoteForward)."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import paramhub

CELLS = [
    ("layers", """
        import torch
        from torch import nn
        from torch.nn import functional as F

        net = MAKE("seq", lambda: nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10)))
        print(net)
        print(net[0].weight)
        X = torch.rand(2, 20)
        net(X).shape
    """),
    ("lazy-materialized", """
        print(net)
        print(net[0].weight.shape, net[2].bias)
    """),
    ("custom-module", """
        class MLP(nn.Module):
            def __init__(self):
                # Call the constructor of the parent class nn.Module
                super().__init__()
                self.hidden = nn.LazyLinear(256)
                self.out = nn.LazyLinear(10)

            # Define the forward propagation of the model
            def forward(self, X):
                return self.out(F.relu(self.hidden(X)))

        net = MAKE("mlp", MLP)
        print(net)
        net(X)
    """),
    ("my-sequential", """
        class MySequential(nn.Module):
            def __init__(self, *args):
                super().__init__()
                for idx, module in enumerate(args):
                    self.add_module(str(idx), module)

            def forward(self, X):
                for module in self.children():
                    X = module(X)
                return X

        net = MAKE("myseq", lambda: MySequential(nn.LazyLinear(256), nn.ReLU(),
                                                 nn.LazyLinear(10)))
        print(net(X).shape)
        net
    """),
    ("control-flow", """
        class FixedHiddenMLP(nn.Module):
            def __init__(self):
                super().__init__()
                # Random weight parameters that will not compute gradients and
                # therefore keep constant during training
                self.rand_weight = torch.rand((20, 20))
                self.linear = nn.LazyLinear(20)

            def forward(self, X):
                X = self.linear(X)
                X = F.relu(X @ self.rand_weight + 1)
                # Reuse the fully connected layer. This is equivalent to sharing
                # parameters with two fully connected layers
                X = self.linear(X)
                # Control flow
                while X.abs().sum() > 1:
                    X /= 2
                return X.sum()

        net = MAKE("fixed", FixedHiddenMLP)
        net(X)
    """),
    ("chimera", """
        class NestMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.LazyLinear(64), nn.ReLU(),
                                         nn.LazyLinear(32), nn.ReLU())
                self.linear = nn.LazyLinear(16)

            def forward(self, X):
                return self.linear(self.net(X))

        chimera = MAKE("chimera", lambda: nn.Sequential(NestMLP(), nn.LazyLinear(20),
                                                        FixedHiddenMLP()))
        print(chimera(X))
        chimera
    """),
    ("parameter-access", """
        net = MAKE("pm", lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(1)))
        X = torch.rand(size=(2, 4))
        net(X).shape
        print(net[2].state_dict())
        print(type(net[2].bias), net[2].bias.data)
        print(net[2].weight.grad == None)
        print([(name, param.shape) for name, param in net.named_parameters()])
    """),
    ("builtin-init", """
        def init_normal(module):
            if type(module) == nn.Linear:
                nn.init.normal_(module.weight, mean=0, std=0.01)
                nn.init.zeros_(module.bias)

        net.apply(init_normal)
        print(net[0].weight.data[0], net[0].bias.data[0])

        def init_constant(module):
            if type(module) == nn.Linear:
                nn.init.constant_(module.weight, 1)
                nn.init.zeros_(module.bias)

        net.apply(init_constant)
        net[0].weight.data[0], net[0].bias.data[0]
    """),
    ("xavier-and-42", """
        def init_xavier(module):
            if type(module) == nn.Linear:
                nn.init.xavier_uniform_(module.weight)

        def init_42(module):
            if type(module) == nn.Linear:
                nn.init.constant_(module.weight, 42)

        net[0].apply(init_xavier)
        net[2].apply(init_42)
        print(net[0].weight.data[0])
        print(net[2].weight.data)
    """),
    ("custom-init", """
        def my_init(module):
            if type(module) == nn.Linear:
                print("Init", *[(name, param.shape)
                                for name, param in module.named_parameters()][0])
                nn.init.uniform_(module.weight, -10, 10)
                module.weight.data *= module.weight.data.abs() >= 5

        net.apply(my_init)
        net[0].weight[:2]
    """),
    ("direct-set", """
        net[0].weight.data[:] += 1
        net[0].weight.data[0, 0] = 42
        net[0].weight.data[0]
    """),
    ("tied", """
        shared = nn.LazyLinear(8)
        net = MAKE("tied", lambda: nn.Sequential(nn.LazyLinear(8), nn.ReLU(), shared, nn.ReLU(),
                                                 shared, nn.ReLU(), nn.LazyLinear(1)))
        net(X)
        print(net[2].weight.data[0] == net[4].weight.data[0])
        net[2].weight.data[0, 0] = 100
        print(net[2].weight.data[0] == net[4].weight.data[0])
    """),
    ("layer-without-parameters", """
        class CenteredLayer(nn.Module):
            def __init__(self):
                super().__init__()

            def forward(self, X):
                return X - X.mean()

        layer = MAKE("centered", CenteredLayer)
        print(layer(torch.tensor([1.0, 2, 3, 4, 5])))
        net = MAKE("centered-net", lambda: nn.Sequential(nn.LazyLinear(128), CenteredLayer()))
        Y = net(torch.rand(4, 8))
        Y.mean().abs() < 1e-6
    """),
    ("layer-with-parameters", """
        class MyLinear(nn.Module):
            def __init__(self, in_units, units):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(in_units, units))
                self.bias = nn.Parameter(torch.randn(units,))

            def forward(self, X):
                linear = torch.matmul(X, self.weight.data) + self.bias.data
                return F.relu(linear)

        linear = MAKE("mylinear", lambda: MyLinear(5, 3))
        print(linear.weight)
        print(linear(torch.rand(2, 5)))
        net = MAKE("mylinear-net", lambda: nn.Sequential(MyLinear(64, 8), MyLinear(8, 1)))
        net(torch.rand(2, 64))
    """),
    ("file-io", """
        class IOMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.hidden = nn.LazyLinear(256)
                self.output = nn.LazyLinear(10)

            def forward(self, x):
                return self.output(F.relu(self.hidden(x)))

        net = MAKE("io", IOMLP)
        X = torch.randn(size=(2, 20))
        Y = net(X)
        torch.save(net.state_dict(), PATH)
        clone = MAKE("io-clone", IOMLP)
        print(clone.load_state_dict(torch.load(PATH)))
        print(clone)
        clone.eval()
        Y_clone = clone(X)
        print(clone)
        Y_clone == Y
    """),
]

_GRAD_FN = re.compile(r", grad_fn=<\w+>")
STARTUP_SECONDS = 120


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
    return _GRAD_FN.sub("", stdout + ("" if value is None else repr(value) + "\n"))


@pytest.fixture
def trusting_server(tmp_path):
    """`paramhub serve --trust-remote-code` in a subprocess; yields its address."""
    exe = Path(sys.executable).parent / "paramhub"
    proc = subprocess.Popen(
        [str(exe), "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
         "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING",
         "--trust-remote-code"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        fd = proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + STARTUP_SECONDS
        while b"\n" not in data:
            assert time.monotonic() < deadline and proc.poll() is None, data
            if select.select([fd], [], [], 1.0)[0]:
                data += os.read(fd, 4096)
        yield data.split(b"\n", 1)[0].decode().split()[-1]
    finally:
        proc.kill()
        proc.wait(30)


def test_textbook_cells_match_local_torch(trusting_server, tmp_path):
    with paramhub.connect(trusting_server, timeout=120) as client:
        client.wait_ready(STARTUP_SECONDS)

        def make_local(name, build):
            torch.manual_seed(0)
            return build()

        def make_remote(name, build):
            torch.manual_seed(0)
            return client.create_model(name, build())

        local_ns = {"MAKE": make_local, "__name__": "__main__", "PATH": str(tmp_path / "l")}
        remote_ns = {"MAKE": make_remote, "__name__": "__main__", "PATH": str(tmp_path / "r")}
        for label, code in CELLS:
            torch.manual_seed(1234)
            local_text = shown(*run_cell(code, local_ns))
            local_state = torch.default_generator.get_state()
            torch.manual_seed(1234)
            remote_text = shown(*run_cell(code, remote_ns))
            assert remote_text == local_text, label
            # Both runs drew the same random numbers, those drawn on the server included.
            assert torch.equal(torch.default_generator.get_state(), local_state), label
        assert {m.name.split("/")[1]: m.source for m in client.list_models()}["mlp"] == "code"
