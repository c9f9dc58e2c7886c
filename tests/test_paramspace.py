import torch
from torch import nn

from sparse_merge.models.paramspace import ParamSpace


def test_round_trip_is_exact_and_shares_storage(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    space = ParamSpace(tiny_llama)
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, before[n])
        assert p.untyped_storage().data_ptr() == space.flat.untyped_storage().data_ptr()
    genome = space.genome()
    assert genome.numel() == space.numel == sum(p.numel() for p in tiny_llama.parameters())
    space.flat.zero_()  # writing the buffer writes the model
    assert all((p == 0).all() for p in tiny_llama.parameters())
    space.load(genome)
    for n, p in tiny_llama.named_parameters():
        assert torch.equal(p, before[n])


def test_tied_weights_get_one_slot(tiny_llama):
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    space = ParamSpace(tiny_llama)
    names = [s.name for s in space.slots]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    space.view(space.flat, "model.embed_tokens.weight")[0, 0] = 123.0
    assert tiny_llama.lm_head.weight[0, 0] == 123.0


def test_model_still_trains_through_views(tiny_llama):
    space = ParamSpace(tiny_llama)
    ids = torch.randint(4, 20, (2, 8))
    loss = tiny_llama(input_ids=ids, labels=ids).loss
    loss.backward()
    before = space.genome()
    torch.optim.SGD(tiny_llama.parameters(), lr=0.1).step()
    assert not torch.equal(space.flat, before)  # the step moved the buffer itself
    for name, param in tiny_llama.named_parameters():
        assert torch.equal(space.view(space.flat, name), param.data)
    assert tiny_llama.model.embed_tokens.weight.data_ptr() == space.flat.data_ptr()


def test_from_model_reads_another_model(tiny_llama, tokenizer):
    from sparse_merge.models.toy import toy_llama

    other = toy_llama(tokenizer, seed=1, hidden_size=32, intermediate_size=64)
    space = ParamSpace(tiny_llama)
    g = space.from_model(other)
    assert torch.equal(space.view(g, "model.norm.weight"), other.model.norm.weight)
    assert torch.equal(
        space.view(g, "model.layers.1.mlp.up_proj.weight"), other.model.layers[1].mlp.up_proj.weight
    )


def test_mixed_dtypes_rejected():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).half())
    try:
        ParamSpace(m)
    except ValueError as e:
        assert "one dtype" in str(e)
    else:
        raise AssertionError("expected ValueError")
