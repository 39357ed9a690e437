"""The shared decoder: attention masks against hand-written layouts, incremental decoding with the KV
cache against the parallel forward, the merged MoE against the explicit mixture, the readout, and a tiny
decoder + readout that learns."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver.decoder import DecoderConfig, KVCache, Modality, SharedDecoder
from uniperceiver.masks import (CaptionLayout, bidirectional_mask, caption_attention_mask,
                                padded_caption_attention_mask)
from uniperceiver.moe import MoEFeedForward, TokenAttribute, attribute_bits
from uniperceiver.readout import SimilarityReadout

WIDTH = 32


def tiny_decoder(moe: bool = False, dtype=torch.float64) -> SharedDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(width=WIDTH, depth=2, heads=4, max_positions=32, drop_path=0.1,
                           moe_experts=4 if moe else 0, moe_top_k=2)
    decoder = SharedDecoder(config).to(dtype).eval()
    with torch.no_grad():  # layer scale starts at 1e-3; make the blocks matter so the test can fail
        for block in decoder.blocks:
            block.gamma1.fill_(1.0)
            block.gamma2.fill_(1.0)
    return decoder


# ---------------------------------------------------------------------------------------------- masks
def test_caption_mask_is_the_hand_written_layout():
    # [SPE, img, img | w0 w1 w2 | q0 q1 q2]
    expected = torch.tensor([
        # S  i  i  w0 w1 w2 q0 q1 q2
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # SPE
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # img
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # img
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # w0: prefix + itself
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # w1
        [1, 1, 1, 1, 1, 1, 0, 0, 0],  # w2
        [1, 1, 1, 0, 0, 0, 1, 0, 0],  # q0: prefix + itself
        [1, 1, 1, 1, 0, 0, 0, 1, 0],  # q1: prefix + w0 + itself
        [1, 1, 1, 1, 1, 0, 0, 0, 1],  # q2: prefix + w0 w1 + itself
    ], dtype=torch.bool)
    assert torch.equal(caption_attention_mask(3, 3), expected)
    layout = CaptionLayout(3, 3)
    assert layout.position_ids().tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert (layout.prefix, layout.words, layout.queries) == (slice(0, 3), slice(3, 6), slice(6, 9))


def test_bidirectional_mask_hides_padding():
    expected = torch.tensor([
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
        [[1, 1, 0], [1, 1, 0], [0, 0, 1]],  # the padded token sees only itself
    ], dtype=torch.bool)
    assert torch.equal(bidirectional_mask(lengths=torch.tensor([3, 2]), length=3), expected)
    assert torch.equal(bidirectional_mask(torch.tensor([[True] * 3, [True, True, False]])), expected)
    assert torch.equal(bidirectional_mask(length=2), torch.ones(2, 2, dtype=torch.bool))


def test_padded_caption_mask_is_the_hand_written_layout():
    # [SPE, img | w0 w1 | q0 q1]; sample 1 has one word and its image token is padding.
    expected = torch.tensor([
        [[1, 1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [1, 1, 0, 0, 1, 0],
         [1, 1, 1, 0, 0, 1]],
        [[1, 0, 0, 0, 0, 0],
         [0, 1, 0, 0, 0, 0],   # padded image token
         [1, 0, 1, 0, 0, 0],
         [0, 0, 0, 1, 0, 0],   # padded word
         [1, 0, 0, 0, 1, 0],
         [0, 0, 0, 0, 0, 1]],  # padded query
    ], dtype=torch.bool)
    mask = padded_caption_attention_mask(2, torch.tensor([2, 1]),
                                         prefix_valid=torch.tensor([[True, True], [True, False]]))
    assert torch.equal(mask, expected)


# ------------------------------------------------------------------------------------------ KV cache
def caption_batch(decoder: SharedDecoder, batch: int = 3, num_image: int = 2, num_words: int = 4):
    torch.manual_seed(1)
    dtype = decoder.spe.weight.dtype
    inputs = decoder.caption_inputs(torch.randn(batch, num_image, WIDTH, dtype=dtype),
                                    torch.full((batch, num_image), int(Modality.IMAGE_PATCH)),
                                    torch.randn(batch, num_words, WIDTH, dtype=dtype))
    attributes = torch.randint(0, 256, (batch, inputs.layout.length))
    return inputs, attributes


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_step_by_step_decoding_matches_parallel_forward(moe):
    """Inference: cache the prefix; at step j append one query (not kept) and then word j (kept)."""
    decoder = tiny_decoder(moe)
    inputs, attributes = caption_batch(decoder)
    layout = inputs.layout
    full = decoder(inputs.tokens, inputs.modality_ids, inputs.position_ids, inputs.attention_mask,
                   attributes=attributes).hidden_states
    queries, words = full[:, layout.queries], full[:, layout.words]

    def part(tensor, index):
        return tensor[:, index] if isinstance(index, slice) else tensor[:, index:index + 1]

    def run(index, cache, **kwargs):
        return decoder(part(inputs.tokens, index), part(inputs.modality_ids, index),
                       part(inputs.position_ids, index), attributes=part(attributes, index), cache=cache, **kwargs)

    prefix_out, cache = run(layout.prefix, None, attention_mask=layout.attention_mask()[layout.prefix, layout.prefix],
                            use_cache=True)
    torch.testing.assert_close(prefix_out, full[:, layout.prefix], rtol=0, atol=1e-10)
    for j in range(layout.num_words):
        query_out, _ = run(layout.queries.start + j, cache)  # default mask: the whole cache + itself
        torch.testing.assert_close(query_out[:, 0], queries[:, j], rtol=0, atol=1e-10)
        word_out, cache = run(layout.words.start + j, cache, use_cache=True)
        torch.testing.assert_close(word_out[:, 0], words[:, j], rtol=0, atol=1e-10)
        assert cache.length == layout.num_prefix + j + 1  # the query never stayed in the cache


def test_word_and_next_query_in_one_call_with_commit():
    """[w_{j-1}, q_j] in one forward with commit=1: the word is cached, the query is not."""
    decoder = tiny_decoder()
    inputs, _ = caption_batch(decoder)
    layout = inputs.layout
    full = decoder(inputs.tokens, inputs.modality_ids, inputs.position_ids, inputs.attention_mask).hidden_states
    q0 = layout.queries.start
    _, cache = decoder(inputs.tokens[:, layout.prefix], inputs.modality_ids[:, layout.prefix],
                       use_cache=True)  # without a cache the default mask is bidirectional
    query_out, _ = decoder(inputs.tokens[:, q0:q0 + 1], inputs.modality_ids[:, q0:q0 + 1], cache=cache)
    torch.testing.assert_close(query_out[:, 0], full[:, q0], rtol=0, atol=1e-10)
    for j in range(1, layout.num_words):
        pick = [layout.words.start + j - 1, q0 + j]
        out, cache = decoder(inputs.tokens[:, pick], inputs.modality_ids[:, pick], use_cache=True, commit=1,
                             cache=cache)  # default positions continue from the cache: P+j-1, P+j
        torch.testing.assert_close(out, full[:, pick], rtol=0, atol=1e-10)
        assert cache.length == layout.num_prefix + j


def test_queries_over_a_cache_of_all_words_with_explicit_mask_rows():
    """Cache prefix + all words once; query j then sees prefix + words < j + itself via its mask row."""
    decoder = tiny_decoder()
    inputs, _ = caption_batch(decoder)
    layout, mask = inputs.layout, inputs.attention_mask
    full = decoder(inputs.tokens, inputs.modality_ids, inputs.position_ids, mask).hidden_states
    context = slice(0, layout.words.stop)
    _, cache = decoder(inputs.tokens[:, context], inputs.modality_ids[:, context], inputs.position_ids[:, context],
                       mask[context, context], use_cache=True)
    for j in range(layout.num_words):
        q = layout.queries.start + j
        row = torch.cat([mask[q:q + 1, context], torch.ones(1, 1, dtype=torch.bool)], 1)
        out, _ = decoder(inputs.tokens[:, q:q + 1], inputs.modality_ids[:, q:q + 1], inputs.position_ids[:, q:q + 1],
                         row, cache=cache)
        torch.testing.assert_close(out[:, 0], full[:, q], rtol=0, atol=1e-10)


def test_beam_reorder_and_padded_prefix():
    """Expand the cache to 2 beams per sample, shuffle the beams, and keep matching the parallel forward,
    with a prefix token of one sample being padding."""
    decoder = tiny_decoder()
    inputs, _ = caption_batch(decoder, batch=2, num_image=2, num_words=3)
    layout = inputs.layout
    prefix_valid = torch.tensor([[True, True, True], [True, True, False]])
    valid = layout.valid(torch.tensor([3, 3]), prefix_valid)
    full = decoder(inputs.tokens, inputs.modality_ids, inputs.position_ids, inputs.attention_mask,
                   valid=valid).hidden_states
    _, cache = decoder(inputs.tokens[:, layout.prefix], inputs.modality_ids[:, layout.prefix],
                       valid=prefix_valid, use_cache=True)
    assert torch.equal(cache.valid, prefix_valid)
    origin = torch.arange(2).repeat_interleave(2)   # beams: [s0, s0, s1, s1]
    cache = cache.reorder(origin)
    for j, shuffle in enumerate([torch.tensor([1, 0, 3, 2]), torch.tensor([3, 2, 1, 0]), torch.tensor([0, 2, 1, 3])]):
        cache, origin = cache.reorder(shuffle), origin[shuffle]
        q, w = layout.queries.start + j, layout.words.start + j
        out, _ = decoder(inputs.tokens[origin, q:q + 1], inputs.modality_ids[origin, q:q + 1], cache=cache)
        torch.testing.assert_close(out[:, 0], full[origin, q], rtol=0, atol=1e-10)
        _, cache = decoder(inputs.tokens[origin, w:w + 1], inputs.modality_ids[origin, w:w + 1], cache=cache,
                           use_cache=True)
    assert isinstance(cache, KVCache) and cache.batch_size == 4
    with pytest.raises(ValueError, match="reorder it first"):
        decoder(inputs.tokens[:, :1], inputs.modality_ids[:, :1], cache=cache)


def test_float32_cache_matches_to_1e5():
    decoder = tiny_decoder(dtype=torch.float32)
    inputs, _ = caption_batch(decoder)
    layout = inputs.layout
    full = decoder(inputs.tokens, inputs.modality_ids, inputs.position_ids, inputs.attention_mask).hidden_states
    _, cache = decoder(inputs.tokens[:, layout.prefix], inputs.modality_ids[:, layout.prefix], use_cache=True)
    for j in range(layout.num_words):
        q, w = layout.queries.start + j, layout.words.start + j
        out, _ = decoder(inputs.tokens[:, q:q + 1], inputs.modality_ids[:, q:q + 1], cache=cache)
        torch.testing.assert_close(out[:, 0], full[:, q], rtol=0, atol=1e-5)
        _, cache = decoder(inputs.tokens[:, w:w + 1], inputs.modality_ids[:, w:w + 1], cache=cache, use_cache=True)


# ----------------------------------------------------------------------------------------------- MoE
def test_merged_moe_equals_explicit_mixture():
    torch.manual_seed(0)
    moe = MoEFeedForward(WIDTH, 64, num_experts=4, top_k=2).double()
    x = torch.randn(2, 7, WIDTH, dtype=torch.float64)
    codes = torch.tensor([[0, 3, 3, 17, 255, 0, 17], [64, 64, 3, 0, 128, 129, 255]])
    gates = moe.gate(codes.reshape(-1))                  # (N, E), zero outside the top-2
    assert torch.equal((gates > 0).sum(-1), torch.full((14,), 2))
    torch.testing.assert_close(gates.sum(-1), torch.ones(14, dtype=torch.float64))

    def mixture(layer, inputs):  # sum_k g_k * expert_k(inputs), expert by expert
        return sum(gates[:, e, None] * F.linear(inputs, layer.weight[e], layer.bias[e])
                   for e in range(layer.weight.shape[0]))

    flat = x.reshape(-1, WIDTH)
    expected = mixture(moe.fc2, F.gelu(mixture(moe.fc1, flat))).reshape(x.shape)
    torch.testing.assert_close(moe(x, codes), expected, rtol=0, atol=1e-12)


def test_moe_routes_by_attribute():
    torch.manual_seed(0)
    moe = MoEFeedForward(WIDTH, 64, num_experts=8, top_k=2)
    text_input = TokenAttribute.INPUT_TEXT | TokenAttribute.TOKEN_TEXT
    image_target = TokenAttribute.INPUT_TEXT | TokenAttribute.TOKEN_VISUAL | TokenAttribute.TARGET_SIDE
    gates = moe.gate(torch.tensor([int(text_input), int(image_target), int(text_input)]))
    assert torch.equal(gates[0], gates[2])               # same attribute, same route
    assert not torch.equal(gates[0] > 0, gates[1] > 0)   # different attribute, different experts
    assert attribute_bits(torch.tensor([int(image_target)])).tolist() == [[0, 1, 0, 0, 1, 0, 1, 0]]
    x = torch.randn(1, 3, WIDTH)
    out = moe(x, torch.tensor([[int(text_input), int(image_target), int(text_input)]]))
    alone = moe(x[:, :1], torch.tensor([[int(text_input)]]))
    torch.testing.assert_close(out[:, :1], alone)       # a token's output does not depend on the others


# ------------------------------------------------------------------------------------------- readout
def test_readout_normalises_and_clamps_the_scale():
    readout = SimilarityReadout(WIDTH, 16, families=("retrieval", "caption"))
    emb = readout(torch.randn(5, WIDTH))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    assert readout.scale("caption").item() == pytest.approx(1 / 0.07, rel=1e-5)
    logits = readout.similarity(emb[:2], emb, "caption")
    torch.testing.assert_close(logits[:, :2].diagonal(), torch.full((2,), 1 / 0.07))
    with torch.no_grad():
        readout.logit_scale["retrieval"].fill_(math.log(1000.0))
    scale = readout.scale("retrieval")
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert readout.logit_scale["retrieval"].grad.item() == 0.0
    assert readout.similarity(emb[:1], emb, "retrieval").abs().max().item() <= 100.0 + 1e-4
    with pytest.raises(KeyError, match="unknown task family 'vqa'"):
        readout.scale("vqa")


# ------------------------------------------------------------------------------------------ learning
def test_tiny_decoder_and_readout_learn_to_match_inputs_to_targets():
    torch.manual_seed(0)
    config = DecoderConfig(width=WIDTH, depth=2, heads=4, max_positions=16, moe_experts=4)
    decoder, readout = SharedDecoder(config), SimilarityReadout(WIDTH, 16)
    n = 6
    inputs, input_ids = decoder.prepend_spe(torch.randn(n, 3, WIDTH), torch.full((n, 3), int(Modality.IMAGE_PATCH)))
    targets, target_ids = decoder.prepend_spe(torch.randn(n, 2, WIDTH), torch.full((n, 2), int(Modality.TEXT)))
    input_attr = torch.full(input_ids.shape, int(TokenAttribute.INPUT_IMAGE | TokenAttribute.TARGET_TEXT))
    target_attr = torch.full(target_ids.shape, int(TokenAttribute.TARGET_SIDE | TokenAttribute.TOKEN_TEXT))
    params = list(decoder.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(50):
        # the <SPE> token is a parameter: rebuild the sequences so that it receives gradients too
        x, _ = decoder.prepend_spe(inputs[:, 1:], input_ids[:, 1:])
        y, _ = decoder.prepend_spe(targets[:, 1:], target_ids[:, 1:])
        a = readout(decoder(x, input_ids, attributes=input_attr).hidden_states[:, 0])
        b = readout(decoder(y, target_ids, attributes=target_attr).hidden_states[:, 0])
        logits = readout.similarity(a, b, "retrieval")
        labels = torch.arange(n)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            unused = {f"logit_scale.{family}" for family in readout.families if family != "retrieval"}
            missing = [name for name, p in [*decoder.named_parameters(), *readout.named_parameters()]
                       if p.grad is None and name not in unused]
            assert not missing, f"no gradient reached {missing}"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert torch.equal(logits.argmax(-1), labels)


def test_attention_pool_equals_torch_multihead_attention():
    """The image encoder's pooling (own Linear layers, for ZeRO-3) computes what nn.MultiheadAttention does with
    the same weights, followed by the LayerNorm."""
    from uniperceiver.image_encoder import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(WIDTH, num_queries=3, heads=4).double()
    reference = nn.MultiheadAttention(WIDTH, 4, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.kv_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.kv_proj.bias]))
        reference.out_proj.weight.copy_(pool.out_proj.weight)
        reference.out_proj.bias.copy_(pool.out_proj.bias)
    tokens = torch.randn(2, 9, WIDTH, dtype=torch.float64)
    queries = pool.queries.expand(2, -1, -1)
    expected = pool.norm(reference(queries, tokens, tokens, need_weights=False)[0])
    torch.testing.assert_close(pool(tokens), expected, rtol=0, atol=1e-10)


def test_state_dicts_of_the_earlier_layout_still_load():
    """Exports written when <SPE> was a bare parameter and the temperatures 0-d tensors load unchanged."""
    torch.manual_seed(0)
    decoder, readout = SharedDecoder(DecoderConfig(width=WIDTH, depth=1, heads=4)), SimilarityReadout(WIDTH, 8)
    old_decoder = {("spe" if k == "spe.weight" else k): v for k, v in decoder.state_dict().items()}
    old_readout = {k: (v.reshape(()) if k.startswith("logit_scale.") else v) for k, v in readout.state_dict().items()}
    fresh_decoder, fresh_readout = SharedDecoder(DecoderConfig(width=WIDTH, depth=1, heads=4)), SimilarityReadout(WIDTH, 8)
    fresh_decoder.load_state_dict(old_decoder)
    fresh_readout.load_state_dict(old_readout)
    torch.testing.assert_close(fresh_decoder.spe.weight, decoder.spe.weight)
    assert fresh_readout.logit_scale["vqa"].shape == (1,)
    assert fresh_readout.scale("vqa").item() == pytest.approx(readout.scale("vqa").item())
