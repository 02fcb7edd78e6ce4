"""Text-only language modelling: the causal rule, attention backends, options, validation, loss and learning."""
import pytest
import torch
import torch.nn.functional as F

from transfusion_pytorch import Transfusion

from test_text_decoding import text_model


def test_causal_rule_by_autograd():
    """Logits at position i have zero gradient w.r.t. the input embedding of every later position,
    and a nonzero one w.r.t. every earlier position."""
    model = text_model()
    ids = torch.randint(0, 32, (1, 12))
    embeddings = model.token_embedding(ids).detach().requires_grad_()
    original = model.token_embedding.forward
    model.token_embedding.forward = lambda _: embeddings
    logits = model.text_logits(ids)
    model.token_embedding.forward = original
    for i in range(12):
        grad, = torch.autograd.grad(logits[0, i].sum(), embeddings, retain_graph = True)
        depends = grad[0].abs().sum(dim = -1) > 0
        assert depends.tolist() == [j <= i for j in range(12)], f'position {i}'


@torch.no_grad()  # flex attention has no CPU backward
def test_backends_agree_on_text():
    model = text_model(attention_backend = 'sdpa')
    flex_model = text_model(attention_backend = 'flex')
    flex_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 32, (2, 40))
    torch.testing.assert_close(flex_model.text_logits(ids), model.text_logits(ids), atol = 1e-4, rtol = 1e-4)


def test_tiny_model_overfits_text():
    model = text_model()
    ids = torch.randint(0, 32, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    first = None
    for _ in range(200):
        loss = model(ids)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


@pytest.mark.parametrize('option', [
    dict(qk_norm = True), dict(unet_skips = True), dict(value_residual = True), dict(laser = True),
    dict(checkpoint_activations = True), dict(dropout = 0.1),
    dict(qk_norm = True, unet_skips = True, value_residual = True, laser = True),
])
def test_every_option_trains_with_gradients_everywhere(option):
    model = text_model(**option)
    model.train()
    loss = model(torch.randint(0, 32, (2, 16)))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_unet_skips_join_mirrored_blocks():
    """U-ViT long skips: block i's output is merged into the input of block depth - 1 - i (with
    depth 4: block 1's into block 2, block 0's into block 3). Merge weights random, so each
    skip counts; at depth 2 the only skip is the previous block's output, which proves nothing."""
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 32, transformer = dict(dim = 64, depth = 4, heads = 2, dim_head = 32, unet_skips = True)).eval()
    transformer = model.transformer
    for merge in transformer.skip_merges:
        torch.nn.init.normal_(merge.proj.weight, std = 0.1)
    inputs, outputs = [], []
    for block in transformer.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        block.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    with torch.no_grad():
        model.text_logits(torch.randint(0, 32, (2, 7)))
        inner, outer = (merge.proj for merge in transformer.skip_merges)   # a merge projects [x, skip] back to dim
        torch.testing.assert_close(inputs[2], inner(torch.cat((outputs[1], outputs[1]), dim = -1)))
        torch.testing.assert_close(inputs[3], outer(torch.cat((outputs[2], outputs[0]), dim = -1)))


def test_text_only_validation():
    model = text_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match = r'sample 1, item 0: text id 40'):
        model(torch.tensor([[1, 2, 3], [4, 40, 5]]))
    with pytest.raises(ValueError, match = 'shape'):
        model(torch.tensor([1, 2, 3]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_text_only_loss_is_next_token_ce():
    """A text-only batch's loss is the mean next-token cross-entropy of its logits."""
    model = text_model().eval()
    ids = torch.randint(0, 32, (3, 9))
    expected = F.cross_entropy(model.text_logits(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(model(ids), expected)
