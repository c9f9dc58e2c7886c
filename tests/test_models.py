import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_merge.models.hf import load_genome, save_causal_lm
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.models.tokenizer import char_tokenizer


def test_tokenizer_saves_and_loads_in_hf_format(tmp_path):
    tok = char_tokenizer()
    text = "12+345=357\nrev:abc=cba"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_saved_model_loads_with_from_pretrained(tmp_path, tiny_llama, tokenizer):
    out = save_causal_lm(tiny_llama, tmp_path / "m", tokenizer)
    assert (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(4, 30, (2, 7))
    assert torch.allclose(loaded(ids).logits, tiny_llama(ids).logits, atol=1e-6)
    assert not list(tmp_path.glob(".m.*"))  # no temporary directory left


def test_load_genome_reads_safetensors_tensor_by_tensor(tmp_path, tiny_llama, tokenizer):
    from sparse_merge.models.toy import toy_llama

    other = toy_llama(tokenizer, seed=3, hidden_size=32, intermediate_size=64)
    save_causal_lm(other, tmp_path / "other")
    space = ParamSpace(tiny_llama)
    genome = load_genome(space, tmp_path / "other")
    assert torch.equal(genome, ParamSpace(other).flat)


def test_a_process_other_than_rank_0_still_saves_a_loadable_model(
    tmp_path, tiny_llama, tokenizer, monkeypatch
):
    """A cache is written by whichever process of a launch holds its lock; transformers writes
    nothing on a torch.distributed rank other than 0, so the weights go out regardless."""
    monkeypatch.setattr(type(tiny_llama), "should_save_on_this_rank", lambda self, main: False)
    out = save_causal_lm(tiny_llama, tmp_path / "m", tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, p in tiny_llama.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_load_genome_reads_what_transformers_reads_and_keeps_untied_heads_apart(tmp_path):
    """A checkpoint saved without the base model's prefix (GPT-2's hub layout) was refused; a
    parent with its own LM head, merged into a model that ties it, lost that head silently."""
    import copy

    import pytest

    from sparse_merge.models.hf import load_causal_lm

    from .tiny_archs import ARCHS

    cls, cfg, _ = ARCHS["gpt2"]
    torch.manual_seed(0)
    lm = cls(copy.deepcopy(cfg)).eval()
    save_causal_lm(lm, tmp_path / "full")
    lm.transformer.save_pretrained(tmp_path / "bare")  # keys h.0..., wte.weight
    space = ParamSpace(load_causal_lm(tmp_path / "full"))
    assert torch.equal(load_genome(space, tmp_path / "bare"), space.flat)

    cls, cfg, _ = ARCHS["qwen2"]
    tied, untied = copy.deepcopy(cfg), copy.deepcopy(cfg)
    tied.tie_word_embeddings, untied.tie_word_embeddings = True, False
    torch.manual_seed(0)
    save_causal_lm(cls(tied).eval(), tmp_path / "tied")
    torch.manual_seed(1)
    save_causal_lm(cls(untied).eval(), tmp_path / "untied")
    space = ParamSpace(load_causal_lm(tmp_path / "tied"))
    with pytest.raises(ValueError, match="lm_head.weight is not its"):
        load_genome(space, tmp_path / "untied")
