from __future__ import annotations

import pytest
import torch

from rnngen.checkpoint import load_checkpoint, save_checkpoint
from rnngen.config import ModelConfig
from rnngen.errors import InputError
from rnngen.model import RNNModel
from rnngen.tokenizers import CharTokenizer


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_state_carry_equals_one_call(arch: str) -> None:
    """Encoding a text in one call equals encoding it in chunks with the state carried."""
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(vocab_size=20, arch=arch, hidden=24, emb_dim=8, layers=3)).eval()
    tokens = torch.randint(20, (2, 50))
    whole, whole_state = model(tokens)
    pieces, state = [], None
    for chunk in tokens.split([1, 7, 20, 22], dim=1):
        logits, state = model(chunk, state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the state matters: starting from a fresh state gives other logits
    fresh, _ = model(tokens[:, 8:])
    assert not torch.allclose(fresh, whole[:, 8:], atol=1e-3)


def test_tied_weights_share_the_matrix() -> None:
    model = RNNModel(ModelConfig(vocab_size=30, hidden=16, emb_dim=16, tie_weights=True))
    assert model.lm_head.weight.data_ptr() == model.encoder.embedding.weight.data_ptr()
    assert not any("proj" in k for k in model.state_dict())
    with pytest.raises(InputError, match="tie-weights"):
        ModelConfig(vocab_size=30, hidden=16, emb_dim=8, tie_weights=True)


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip_identical_logits(tmp_path, tie: bool) -> None:
    tok = CharTokenizer.fit(["hello world, a checkpoint test"])
    torch.manual_seed(1)
    model = RNNModel(ModelConfig(vocab_size=tok.vocab_size, hidden=16, emb_dim=16, tie_weights=tie)).eval()
    save_checkpoint(tmp_path / "ck", model, tok, {"training": {"step": 3}})
    loaded, tok2, config, directory = load_checkpoint(tmp_path / "ck")
    x = torch.from_numpy(tok.encode("hello world").astype("int64")).unsqueeze(0)
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert tok2.to_dict() == tok.to_dict()
    assert config["training"]["step"] == 3 and directory == tmp_path / "ck"


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_weight_drop_masks_each_hidden_matrix_once_per_call(arch: str) -> None:
    """Training with weight_drop is the plain network with each W_hh times one dropout mask (scaled by
    1/(1-p)) for the whole sequence; the input matrices and evaluation are untouched."""
    config = ModelConfig(vocab_size=12, arch=arch, hidden=16, emb_dim=8, layers=2, dropout=0.0, weight_drop=0.4)
    model = RNNModel(config)
    tokens = torch.randint(0, 12, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    model.train()
    dropped_logits, _ = model(tokens)
    plain = RNNModel(config)
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(7)  # the same draws, in the same order: one mask per W_hh
    with torch.no_grad():
        for name, w in plain.encoder.rnn.named_parameters():
            if name.startswith("weight_hh"):
                w.copy_(torch.nn.functional.dropout(w, 0.4))
    plain.eval()
    expected, _ = plain(tokens)
    torch.testing.assert_close(dropped_logits, expected)
    model.eval()
    evaluated, _ = model(tokens)
    assert not torch.allclose(evaluated, expected, atol=1e-4)  # evaluation uses the whole matrices
    model.train()
    again, _ = model(tokens)
    assert not torch.allclose(again, dropped_logits, atol=1e-4)  # a fresh mask each call
    again.sum().backward()
    assert model.encoder.rnn.weight_hh_l1.grad.abs().sum() > 0  # gradients reach the dropped matrices


def test_config_rejects_impossible_values() -> None:
    for bad in ({"layers": 0}, {"hidden": 0}, {"dropout": 1.0}, {"weight_drop": -0.1}, {"arch": "transformer"}):
        with pytest.raises(InputError):
            ModelConfig(vocab_size=10, **bad)
