"""The D2L "Parameter Management" walkthrough against a served model.

Run `make serve` in one terminal, then `.venv/bin/python examples/walkthrough.py`. The code is
the seed notebook's, cell by cell; only the lines that create `net` and `rgnet` differ (marked
"# paramhub:"). Set PARAMHUB_TARGET to reach another server.
"""

import torch
import torch.nn as nn

import paramhub

client = paramhub.connect()  # $PARAMHUB_TARGET or 127.0.0.1:50051
for name in ("mlp", "rgnet", "shared"):  # start fresh on every run
    if any(m.name == f"models/{name}" for m in client.list_models()):
        client.delete_model(name)

# In [50]
net = client.create_model("mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))  # paramhub:
X = torch.rand(size=(2, 4))
print(net(X))

# In [8], In [10]
print(net[0].state_dict())
print(net[2].state_dict())

# In [13]
print(type(net[2].bias))
print(net[2].bias)
print(net[2].bias.data)

# In [14]
print(net[2].weight.grad == None)  # noqa: E711 (as in the seed)

# In [22]
print(*[(name, param.shape) for name, param in net[0].named_parameters()])
print(*[(name, param.shape) for name, param in net.named_parameters()])

# In [23]
print(net.state_dict()['2.bias'].data)


# In [28]
def block1():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())


def block2():
    net = nn.Sequential()
    for i in range(4):
        net.add_module(f'block{i}', block1())
    return net


rgnet = client.create_model("rgnet", nn.Sequential(block2(), nn.Linear(4, 1)))  # paramhub:
print(rgnet(X))

# In [29], In [30]
print(rgnet)
print(rgnet[0][1][0].bias.data)


# In [34]
def init_normal(m):
    if type(m) == nn.Linear:
        nn.init.normal_(m.weight, mean=0, std=0.01)
        nn.init.zeros_(m.bias)


net.apply(init_normal)
print(net[0].weight.data, net[0].bias.data[0])


# In [36]
def init_constant(m):
    if type(m) == nn.Linear:
        nn.init.constant_(m.weight, 1)
        nn.init.zeros_(m.bias)


net.apply(init_constant)
print(net[0].weight.data, net[0].bias.data)


# In [40]
def xavier(m):
    if type(m) == nn.Linear:
        nn.init.xavier_uniform_(m.weight)


def init_42(m):
    if type(m) == nn.Linear:
        nn.init.constant_(m.weight, 42)


net[0].apply(xavier)
net[2].apply(init_42)
print(net[0].weight.data)
print(net[2].weight.data)


# In [46]
def my_init(m):
    if type(m) == nn.Linear:
        print("Init", *[(name, param.shape) for name, param in m.named_parameters()][0])
        nn.init.uniform_(m.weight, -10, 10)
        m.weight.data *= m.weight.data.abs() >= 5


net.apply(my_init)
print(net[0].weight)

# In [48]
net[0].weight.data[:] += 1
net[0].weight.data[0, 0] = 42
print(net[0].weight.data)

# In [51]
shared = nn.Linear(8, 8)
net = client.create_model("shared", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(),  # paramhub:
                                                  shared, nn.ReLU(), nn.Linear(8, 1)))
print(net(X))
print(net[2].weight.data[0] == net[4].weight.data[0])
net[2].weight.data[0, 0] = 100
print(net[2].weight.data[0] == net[4].weight.data[0])
print("tied on the server:", client.check_shared(net, "2.weight", "4.weight"))
print("RPCs made:", sum(client.rpc_counts.values()), dict(client.rpc_counts))
