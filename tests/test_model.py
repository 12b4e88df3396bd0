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


def test_config_rejects_impossible_values() -> None:
    for bad in ({"layers": 0}, {"hidden": 0}, {"dropout": 1.0}, {"arch": "transformer"}):
        with pytest.raises(InputError):
            ModelConfig(vocab_size=10, **bad)
