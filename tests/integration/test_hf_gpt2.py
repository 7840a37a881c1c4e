"""A small Hugging Face GPT-2 (random init from a config, nothing downloaded) served as trusted
code: printed as locally, lm_head tied to wte, greedy generation through Forward and a few
AdamW fine-tuning steps with paramhub.optim, all equal to local transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import paramhub
from paramhub_server.app import build_server

transformers = pytest.importorskip("transformers")


def _config():
    # No dropout, so that the served and the local training steps compute the same thing.
    return transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                   n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=0, eos_token_id=0)


@pytest.fixture
def trusted(settings):
    srv = build_server(dataclasses.replace(settings, trust_remote_code=True, data_dir=None))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=120) as c:
            yield c
    finally:
        srv.stop(grace=None)


def _generate(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False, return_dict=False)[0]
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_gpt2_served_as_code_prints_generates_and_fine_tunes_like_local(trusted):
    torch.manual_seed(0)
    local = transformers.GPT2LMHeadModel(_config())
    net = trusted.create_model("gpt2", local)
    assert repr(net) == repr(local)
    assert trusted.check_shared(net, "transformer.wte.weight", "lm_head.weight")
    assert net.lm_head.weight is net.transformer.wte.weight

    local.eval()
    net.eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(_generate(net, prompt, 4), _generate(local, prompt, 4))

    local.train()
    net.train()
    opt = paramhub.optim.AdamW(net.parameters(), lr=1e-3)
    local_opt = torch.optim.AdamW(local.parameters(), lr=1e-3)
    batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, o in ((net, opt), (local, local_opt)):
            o.zero_grad()
            loss = model(batch, labels=batch, use_cache=False, return_dict=False)[0]
            loss.backward()
            o.step()
    for (n, p), (_, q) in zip(net.named_parameters(), local.named_parameters(), strict=True):
        assert torch.allclose(p.fetch(), q.detach(), atol=1e-5), n
    # The tie survived the optimizer steps.
    assert torch.equal(net.lm_head.weight.fetch(), net.transformer.wte.weight.fetch())


def test_gpt2_example_runs(trusted, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    monkeypatch.setenv("PARAMHUB_TARGET", trusted.target)
    example = Path(__file__).parents[2] / "examples" / "gpt2_trusted_code.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPT2LMHeadModel(" and "lm_head tied to wte: True" in out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out if line.startswith("step ")]
    assert len(losses) == 5 and losses[-1] < losses[0]
