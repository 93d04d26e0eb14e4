"""Growing a model deeper: the same predictions at first, then new layers that train."""

import torch
from conftest import make_model

from musicgpt.grow import deepen


def test_a_deepened_model_predicts_exactly_what_it_grew_from():
    model = make_model(n_layer=2)
    grown = deepen(model, extra=2)
    assert grown.config.n_layer == 4 and len(grown.blocks) == 4
    seq = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown(seq).logits, model(seq).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(grown.blocks[2].attn.qkv.weight, model.blocks[1].attn.qkv.weight)


def test_the_new_layers_learn():
    grown = deepen(make_model(n_layer=1)).train()
    seq = torch.randint(0, grown.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    for _ in range(2):  # the zero projection moves first, then the layers under it get gradients
        opt.zero_grad()
        grown(seq[:, :-1], targets=seq[:, 1:]).loss.backward()
        opt.step()
    assert grown.blocks[1].mlp.out.weight.abs().sum() > 0
    assert grown.blocks[1].mlp.fc.weight.grad.abs().sum() > 0
