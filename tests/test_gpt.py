"""GPT: causality, GPT-2 layout and init, errors, generation, registered shapes, FP8 swap, and an LM run end to end."""

import csv
import math
import resource

import pytest
import torch
import torch.nn.functional as F

import swinlab
from swinlab.cli import main
from swinlab.models.gpt import GPT, GPTConfig


def tiny(**kwargs) -> GPT:
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **kwargs}))


def test_logits_at_t_depend_only_on_tokens_up_to_t():
    model = tiny().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9], b[:, 9])


def test_gpt2_layout_tied_embeddings_and_param_count():
    with torch.device("meta"):
        model = swinlab.create_model("gpt2_small")
    assert model.lm_head.weight is model.transformer.wte.weight
    keys = set(model.state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.attn.c_attn.weight",
            "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight"} <= keys  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small, embeddings counted once


def test_gpt2_init_scales_residual_projections():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256))
    block = model.transformer.h[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for proj in (block.attn.c_proj, block.mlp.c_proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.03)
        assert torch.count_nonzero(proj.bias) == 0


def test_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        model(torch.full((1, 4), 256))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(TypeError):
        swinlab.create_model("gpt_nano", n_embed=64)  # a misspelt field is not silently ignored


def test_generate_greedy_topk_and_context_cropping():
    model = tiny().eval()
    prompt = torch.randint(0, 256, (2, 5))
    greedy = model.generate(prompt, 20, temperature=0)
    assert greedy.shape == (2, 25) and torch.equal(greedy[:, :5], prompt)  # 25 > block_size: context is cropped
    assert torch.equal(model.generate(prompt, 20, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)
    sampled = [model.generate(prompt, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 3)]
    assert torch.equal(*sampled)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


def test_learns_a_repeated_text():
    torch.manual_seed(0)
    model = tiny()
    data = torch.tensor(list(b"the cat sat on the mat. " * 3))
    x, y = data[:-1][:16].unsqueeze(0), data[1:][:16].unsqueeze(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0  # from ln(256) = 5.5


def test_grad_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 256, (2, 16))
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = tiny()
        model.set_grad_checkpointing(enable)
        model(idx).square().mean().backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_registered_shapes_including_the_papers_on_meta():
    assert {"gpt_nano", "gpt_micro", "gpt_mini", "gpt2_small", "gpt_7b", "gpt_13b", "gpt_175b"} <= set(
        swinlab.list_models("gpt*")
    )
    with torch.device("meta"):
        big = {n: swinlab.create_model(n) for n in ("gpt_7b", "gpt_13b", "gpt_175b")}
    counts = {n: sum(p.numel() for p in m.parameters()) / 1e9 for n, m in big.items()}
    assert counts["gpt_7b"] == pytest.approx(6.66, abs=0.01)
    assert counts["gpt_13b"] == pytest.approx(12.85, abs=0.01)
    assert counts["gpt_175b"] == pytest.approx(174.6, abs=0.1)
    c = big["gpt_175b"].config
    assert (c.n_layer, c.n_embd, c.n_head, c.block_size) == (96, 12288, 96, 2048)


def _info_builds_only_on_meta(name: str, monkeypatch, capsys) -> str:
    """Run `swinlab info NAME`; every model it builds must hold its parameters on the meta device, and the process's
    peak memory must not grow by anything like the weights' size."""
    built = []
    real = swinlab.create_model

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(swinlab, "create_model", recording)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert main(["info", name]) == 0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert built and all(devices == {"meta"} for devices in built), built
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"
    return capsys.readouterr().out


def test_info_on_7b_allocates_nothing(monkeypatch, capsys):
    out = _info_builds_only_on_meta("gpt_7b", monkeypatch, capsys)  # 27 GB of FP32 weights if built for real
    assert "meta device" in out and "6658.40 M" in out and "2x2048" in out


@pytest.mark.slow
def test_info_on_175b_allocates_nothing(monkeypatch, capsys):
    out = _info_builds_only_on_meta("gpt_175b", monkeypatch, capsys)
    assert "meta device" in out and "174604.26 M" in out and "2x2048" in out


def test_fp8_o1_swaps_block_linears_but_not_the_tied_head_nor_the_first_block():
    from swinlab.fp8 import FP8Linear

    def swapped(model):
        return {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}

    def block_linears(*blocks):
        names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        return {f"transformer.h.{i}.{name}" for i in blocks for name in names}

    model, _ = swinlab.fp8.initialize(swinlab.create_model("gpt_nano"), None, "O1")
    assert swapped(model) == block_linears(1)  # GPT.fp8_high_precision: the first block stays FP32
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.isfinite(model(torch.randint(0, 256, (2, 32)))).all()
    everything, _ = swinlab.fp8.initialize(swinlab.create_model("gpt_nano"), None, "O1", high_precision=())
    assert swapped(everything) == block_linears(0, 1)
    one_layer = swinlab.create_model("gpt_nano", n_layer=1)
    with pytest.warns(UserWarning, match="no linear of the model became FP8"):
        swinlab.fp8.initialize(one_layer, None, "O1")
    with pytest.raises(ValueError, match=r"no module named 'transformer\.h\.7'"):
        swinlab.fp8.initialize(swinlab.create_model("gpt_nano"), None, "O1", high_precision=["transformer.h.7"])


def test_train_and_eval_a_tiny_lm_run(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("It was the best of times, it was the worst of times. " * 40)
    run = tmp_path / "run"
    overrides = ["data.name=text", f"data.root={corpus}", "data.seq_len=32", "data.batch_size=8", "epochs=1",
                 "max_steps_per_epoch=4", f"output_dir={run}", "model.kwargs={n_layer: 1}"]  # fmt: skip
    assert main(["train", "configs/gpt_nano_stdlib.yaml", *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits/byte" in out and "best val loss" in out
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert float(rows[-1]["val_ppl"]) == pytest.approx(math.exp(float(rows[-1]["val_loss"])))
    assert (run / "curves.png").stat().st_size > 0
    assert main(["eval", str(run)]) == 0
    assert f"perplexity {float(rows[-1]['val_ppl']):.3f}" in capsys.readouterr().out
