"""The imported network computes what the authors' network computes: import -> load_generator -> forward against an
independent re-implementation of their computation (tests/thesis/reference.py), at small settings."""

from __future__ import annotations

import pytest
import torch

from synth7t.model_folder import load_generator


def _context(b: int, tokens: list[list[float]]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.float32).view(b, -1, 1)


def test_imported_network_equals_the_authors_computation(authors_files, imported_model):
    net, cfg = load_generator(imported_model)
    assert cfg["model"]["kind"] == "thesis_published"
    ref = authors_files["net"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 24, 24, generator=g)
    ctx = _context(3, [[1.0, 70.0, 0.3], [0.0, 55.0, -0.8], [1.0, 81.5, 0.0]])  # [sex, age, position]
    with torch.no_grad():
        want = ref(x, torch.ones(3), ctx)
        got = net(x, ctx)
    assert got.shape == (3, 1, 24, 24)
    assert want.abs().max() > 0.01  # random weights everywhere: a real output, not zeros
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # channels-last (how prediction runs it on a CPU) computes the same
    with torch.no_grad():
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), ctx)
    assert (cl - want).abs().max() <= 1e-4 * want.abs().max()


def test_covariate_tokens_order_free_number_matters(imported_model):
    net, _ = load_generator(imported_model)
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = net(x, _context(1, [[1.0, 70.0, 0.3]]))
        permuted = net(x, _context(1, [[0.3, 1.0, 70.0]]))
        other_age = net(x, _context(1, [[1.0, 40.0, 0.3]]))
        four = net(x, _context(1, [[1.0, 70.0, 0.3, 0.0]]))
    assert torch.allclose(a, permuted, rtol=1e-5, atol=1e-6)  # tokens without a type embedding
    assert not torch.allclose(a, other_age, rtol=1e-3, atol=1e-5)  # the covariates matter
    assert not torch.allclose(a, four, rtol=1e-3, atol=1e-5)  # so does their number


def test_a_diagnostic_token_is_a_fourth_token(thesis, tmp_path):
    """params whose conditions list Diagnostic: four tokens, as the authors coded them."""
    from synth7t.thesis import import_thesis

    params = {**thesis.SMALL, "conditions": ["Sex", "Age", "Diagnostic", "position"]}
    ref = thesis.reference_net(params, seed=3)
    ckpt = thesis.save_authors_checkpoint(ref, tmp_path / "diag.pt")
    (tmp_path / "params.txt").write_text(str(params))
    from synth7t.io import save_volume

    t7 = save_volume(tmp_path / "t7.nii.gz", thesis.template_volume())
    model = import_thesis(ckpt, tmp_path / "params.txt", t7, tmp_path / "model")
    net, cfg = load_generator(model)
    assert cfg["requires_covariates"] == ["sex", "age", "diagnosis"]
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    ctx = _context(2, [[1.0, 70.0, 1.0, 0.2], [0.0, 66.0, 0.0, -0.1]])
    with torch.no_grad():
        want, got = ref(x, torch.ones(2), ctx), net(x, ctx)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_bad_input_shapes_are_refused(imported_model):
    net, _ = load_generator(imported_model)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 3, 24, 22), _context(1, [[1.0, 70.0, 0.0]]))
    with pytest.raises(ValueError, match="context must be"):
        net(torch.zeros(1, 3, 24, 24), None)


def test_folded_time_embedding_is_the_authors_constant(authors_files, thesis):
    """The module has no time path: each block's conv1 bias holds in_layers.2.bias + emb_layers(SiLU(emb(1)))."""
    from synth7t.nn.published import PublishedUNet
    from synth7t.thesis import convert_state, published_config
    from synth7t.torchfile import read_state_dict

    sd, _ = read_state_dict(authors_files["checkpoint"])
    cfg = published_config(thesis.SMALL)
    ours = convert_state(sd, cfg)
    assert not any("time" in k or "emb" in k for k in PublishedUNet(cfg).state_dict())
    ref = authors_files["net"]
    half = 8  # channels / 2: the sinusoidal code of t = 1
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    emb = ref.time_embed(torch.cat([f.cos(), f.sin()])[None])
    blk = ref.input_blocks[1][0]
    want = blk.in_layers[2].bias + blk.emb_layers(emb)[0]
    assert torch.allclose(ours["down.0.0.conv1.bias"], want.detach(), atol=1e-5)
