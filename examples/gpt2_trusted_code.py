"""A small Hugging Face GPT-2 served as trusted code: printed, tied weights checked, a few
tokens generated through Forward, and a few fine-tuning steps with a server-side optimizer.

    pip install 'paramhub[hf]'                                   # transformers
    paramhub serve --trust-remote-code                           # in another terminal
    .venv/bin/python examples/gpt2_trusted_code.py

The model is built from a config with random weights (nothing is downloaded). GPT2LMHeadModel
is a user-defined nn.Module class, so it travels as code: only a server started with
--trust-remote-code (whose admins may then run code there) accepts it. The server is
$PARAMHUB_TARGET or 127.0.0.1:50051.
"""

from __future__ import annotations

import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import paramhub

MODEL_ID = "gpt2-tiny"


def main() -> None:
    target = os.environ.get("PARAMHUB_TARGET", "127.0.0.1:50051")
    with paramhub.connect(target, timeout=120) as client:
        if any(m.name == f"models/{MODEL_ID}" for m in client.list_models()):
            client.delete_model(MODEL_ID)
        config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        net = client.create_model(MODEL_ID, GPT2LMHeadModel(config))
        print(net)
        print("lm_head tied to wte:",
              client.check_shared(net, "transformer.wte.weight", "lm_head.weight"))

        # Greedy generation: each step is one Forward of the whole prefix on the server.
        net.eval()
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            for _ in range(8):
                logits = net(ids, use_cache=False, return_dict=False)[0]
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        print("generated:", ids.tolist())

        # Fine-tuning: the loss is computed on the server, backward() reaches it (remote
        # autograd) and AdamW steps there.
        net.train()
        opt = paramhub.optim.AdamW(net.parameters(), lr=1e-3)
        batch = torch.randint(0, config.vocab_size, (4, 16), generator=torch.Generator()
                              .manual_seed(1))
        for step in range(5):
            opt.zero_grad()
            loss = net(batch, labels=batch, use_cache=False, return_dict=False)[0]
            loss.backward()
            opt.step()
            print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
