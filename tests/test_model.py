"""The encoder computes what Hugging Face's BERT computes.

Reference: `transformers.BertModel` / `BertForSequenceClassification` (test-only dependency), in eval mode and
fp32, with both its "sdpa" and "eager" attention. Checked on the real all-MiniLM-L6-v2 checkpoint and on small
random models saved by `transformers` itself (safetensors, `pytorch_model.bin`, and an old-style checkpoint).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import minisnip
from minisnip.config import ConfigError
from minisnip.model import LayerTrace

transformers = pytest.importorskip("transformers")

TEXTS = ["The sailors rode the breeze clear of the rocks.",
         "Short one.",
         "A considerably longer first segment, with punctuation; numbers like 3.14 and an accent: café.",
         "hello"]
PAIRS = ["They sailed safely past the rocks.",
         "A pair whose second segment is much longer than the first one, so the batch needs padding.",
         "Tiny.",
         "world"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """(minisnip model, minisnip tokenizer) for all-MiniLM-L6-v2, loaded once per module."""
    return minisnip.BertModel.from_pretrained(minilm_path).eval(), minisnip.load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def batch(minilm):
    """Sentence pairs of different lengths: padding and token type 1 both occur."""
    _, tok = minilm
    b = tok(TEXTS, PAIRS, max_length=128)
    assert (b["attention_mask"] == 0).any() and (b["token_type_ids"] == 1).any()
    return b


def hf_reference(folder, impl: str, cls_name: str = "BertModel"):
    return getattr(transformers, cls_name).from_pretrained(str(folder), attn_implementation=impl).eval()


def test_tokenizer_inputs_equal_hf(minilm_path, minilm):
    _, tok = minilm
    ref = transformers.BertTokenizerFast.from_pretrained(str(minilm_path))
    ours = tok(TEXTS, PAIRS, max_length=128)
    theirs = ref(TEXTS, PAIRS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_minilm_hidden_states_equal_hf(minilm_path, minilm, batch, impl):
    model, _ = minilm
    ref = hf_reference(minilm_path, impl)
    with torch.no_grad():
        ours = model(**batch)
        out = ref(**batch)
    theirs = out.last_hidden_state
    assert ours.shape == theirs.shape == (len(TEXTS), batch["input_ids"].shape[1], 384)
    real = batch["attention_mask"].bool()
    # every real token within 1e-5
    assert (ours - theirs)[real].abs().max() <= ATOL
    # padded positions mean nothing (Hugging Face computes them anyway); minisnip packs the real tokens and
    # never computes them: they come back as exactly 0
    assert torch.count_nonzero(ours[~real]) == 0
    # and the pooler, on [CLS]
    assert torch.allclose(model.pooler(ours), out.pooler_output, atol=ATOL, rtol=0)


def test_minilm_single_sentences_equal_hf(minilm_path, minilm):
    """Single sentences, no attention mask and no token types given: the defaults match Hugging Face's."""
    model, tok = minilm
    ids = tok(["A single sentence without a pair."])["input_ids"]
    ref = hf_reference(minilm_path, "sdpa")
    with torch.no_grad():
        assert torch.allclose(model(ids), ref(ids).last_hidden_state, atol=ATOL, rtol=0)


# --- small random models saved by transformers ----------------------------------------------------------------
def _tiny_inputs(vocab_size: int = 1000, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    types[1, 3:7] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _old_style_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """What a BertForPreTraining checkpoint of 2019 holds: `bert.` prefixes, LayerNorm gamma/beta, cls.* heads."""
    sd = {}
    for k, v in hf_model.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v.clone()
    hidden, vocab = hf_model.config.hidden_size, hf_model.config.vocab_size
    sd["bert.embeddings.position_ids"] = torch.arange(hf_model.config.max_position_embeddings)[None]
    sd["cls.predictions.bias"] = torch.randn(vocab)
    sd["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden)
    sd["cls.predictions.transform.dense.bias"] = torch.randn(hidden)
    sd["cls.predictions.transform.LayerNorm.gamma"] = torch.randn(hidden)
    sd["cls.predictions.transform.LayerNorm.beta"] = torch.randn(hidden)
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    sd["cls.seq_relationship.weight"] = torch.randn(2, hidden)
    sd["cls.seq_relationship.bias"] = torch.randn(2)
    return sd


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, hf_tiny_model):
    """One random 2-layer HF BERT written three ways: safetensors, pytorch_model.bin, old-style .bin."""
    hf = hf_tiny_model("BertModel", seed=0)
    root = tmp_path_factory.mktemp("tiny_hf")
    folders = {name: root / name for name in ("safetensors", "bin", "old_style")}
    hf.save_pretrained(folders["safetensors"])
    assert (folders["safetensors"] / "model.safetensors").is_file()
    for name in ("bin", "old_style"):
        folders[name].mkdir()
        hf.config.to_json_file(folders[name] / "config.json")
    torch.save(hf.state_dict(), folders["bin"] / "pytorch_model.bin")
    torch.save(_old_style_state_dict(hf), folders["old_style"] / "pytorch_model.bin")
    return folders


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "old_style"])
def test_random_model_equals_hf(tiny_folders, fmt, impl):
    folder = tiny_folders[fmt]
    ref = hf_reference(tiny_folders["safetensors"], impl)
    model = minisnip.BertModel.from_pretrained(folder).eval()
    assert model.config.hidden_size == 64 and len(model.layers) == 2
    inputs = _tiny_inputs()
    with torch.no_grad():
        ours = model(**inputs)
        out = ref(**inputs)
    assert ours.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    real = inputs["attention_mask"].bool()
    assert not real.all()
    assert torch.allclose(ours[real], out.last_hidden_state[real], atol=ATOL, rtol=0)
    assert torch.count_nonzero(ours[~real]) == 0  # padded positions are never computed
    assert torch.allclose(model.pooler(ours), out.pooler_output, atol=ATOL, rtol=0)


def test_fused_qkv_holds_hf_query_key_value(tiny_folders):
    """The fused rows are [Q; K; V], each head-major, exactly Hugging Face's matrices stacked."""
    ref = hf_reference(tiny_folders["safetensors"], "eager")
    model = minisnip.BertModel.from_pretrained(tiny_folders["safetensors"])
    attn, hf_self = model.layers[1].attention, ref.encoder.layer[1].attention.self
    for t, hf_lin in enumerate((hf_self.query, hf_self.key, hf_self.value)):
        for h in range(4):
            rows = attn.head_rows(h)[t]
            assert torch.equal(attn.qkv.weight[rows], hf_lin.weight[h * 16:(h + 1) * 16])
            assert torch.equal(attn.qkv.bias[rows], hf_lin.bias[h * 16:(h + 1) * 16])


# --- classification ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [3, 1])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_classifier_logits_and_loss_equal_hf(tmp_path, hf_tiny_model, num_labels, impl):
    hf = hf_tiny_model("BertForSequenceClassification", seed=2, num_labels=num_labels)
    hf.save_pretrained(tmp_path)
    ref = hf_reference(tmp_path, impl, "BertForSequenceClassification")
    model = minisnip.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert model.config.num_labels == num_labels and model.is_regression == (num_labels == 1)
    inputs = _tiny_inputs()
    labels = torch.tensor([0, 2, 1]) if num_labels == 3 else torch.tensor([0.5, 4.25, 2.0])
    with torch.no_grad():
        logits = model(**inputs)
        out = ref(**inputs, labels=labels)
    assert logits.shape == (3, num_labels)
    assert logits.abs().max() > 0.1
    assert torch.allclose(logits, out.logits, atol=ATOL, rtol=0)
    loss = model.loss(logits, labels)
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-5)
    expected = F.mse_loss(logits.squeeze(-1), labels) if num_labels == 1 else F.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_classifier_from_plain_encoder_gets_new_head(tiny_folders, caplog):
    """A BertModel folder gives a classifier whose encoder is the checkpoint's and whose head is new (and logged)."""
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folders["safetensors"], num_labels=3).eval()
    enc = minisnip.BertModel.from_pretrained(tiny_folders["safetensors"])
    assert all(torch.equal(a, b) for a, b in zip(model.bert.state_dict().values(), enc.state_dict().values()))
    assert model.classifier.weight.shape == (3, 64)
    assert "classifier head is newly initialised" in caplog.text


# --- the trace and per-head outputs -------------------------------------------------------------------------------
def test_trace_is_consistent(minilm, batch):
    model, _ = minilm
    trace: list[LayerTrace] = []
    with torch.no_grad():
        out = model(**batch, trace=trace)
        emb = model.embeddings(batch["input_ids"], batch["token_type_ids"])
    assert len(trace) == len(model.layers) == 6
    b, s = batch["input_ids"].shape
    assert torch.equal(trace[0].x, emb)
    real = batch["attention_mask"].bool()
    assert torch.equal(trace[-1].y[real], out[real])  # the returned states are 0 at padded positions
    assert torch.count_nonzero(out[~real]) == 0
    for i, (t, layer) in enumerate(zip(trace, model.layers)):
        assert t.context.shape == (b, 12, s, 32)
        assert t.attention_out.shape == t.h.shape == t.y.shape == t.ffn_out.shape == (b, s, 384)
        assert t.ffn_act.shape == (b, s, 1536)
        if i:
            assert torch.equal(t.x, trace[i - 1].y)
        with torch.no_grad():
            assert torch.allclose(layer.attention_norm(t.x + t.attention_out), t.h, atol=ATOL, rtol=0)
            assert torch.allclose(layer.ffn_norm(t.h + t.ffn_out), t.y, atol=ATOL, rtol=0)
            assert torch.allclose(layer.attention.project(t.context), t.attention_out, atol=ATOL, rtol=0)
            assert torch.allclose(layer.ffn.project(t.ffn_act), t.ffn_out, atol=ATOL, rtol=0)
            assert torch.allclose(layer.attention(t.x, batch["attention_mask"].bool()[:, None, None, :]),
                                  t.attention_out, atol=ATOL, rtol=0)
            assert torch.allclose(layer.ffn(t.h), t.ffn_out, atol=ATOL, rtol=0)
        assert t.attention_out.norm() > 1.0 and t.ffn_out.norm() > 1.0  # real branches, not zeros


def test_head_outputs_sum_to_projection(minilm, batch):
    model, _ = minilm
    trace: list[LayerTrace] = []
    with torch.no_grad():
        model(**batch, trace=trace)
        for t, layer in zip(trace, model.layers):
            per_head = layer.attention.head_outputs(t.context)
            assert per_head.shape == (*t.context.shape[:1], 12, t.context.shape[2], 384)
            total = per_head.sum(1) + layer.attention.out.bias
            assert torch.allclose(total, layer.attention.project(t.context), atol=ATOL, rtol=0)
            # each head's slice alone: W_O[:, cols_h] ctx_h
            h = 5
            alone = t.context[:, h] @ layer.attention.out.weight[:, layer.attention.head_columns(h)].T
            assert torch.allclose(per_head[:, h], alone, atol=ATOL, rtol=0)


def test_written_out_heads_equal_the_fused_path(tiny_model):
    """attention_head per head and project_heads (the readable references) equal the fused SDPA path."""
    from minisnip.model import attention_head, project_heads
    model = tiny_model(minisnip.BertModel, seed=2)
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    trace: list[LayerTrace] = []
    with torch.no_grad():
        model(ids, mask, trace=trace)
        for t, layer in zip(trace, model.layers):
            attn = layer.attention
            w, b = attn.qkv.weight, attn.qkv.bias
            for h in range(attn.num_heads):
                q, k, v = (F.linear(t.x, w[r], b[r]) for r in attn.head_rows(h))
                ctx = attention_head(q, k, v, mask.bool()[:, None, :])
                assert torch.allclose(ctx, t.context[:, h], atol=1e-5, rtol=0)
            out = project_heads(t.context, attn.out.weight, attn.out.bias)
            assert torch.allclose(out, t.attention_out, atol=1e-5, rtol=0)


def test_eval_is_deterministic_and_train_uses_dropout(minilm, batch):
    model, _ = minilm
    with torch.no_grad():
        a, b = model(**batch), model(**batch)
        assert torch.equal(a, b)
        model.train()
        try:
            torch.manual_seed(0)
            c = model(**batch)
        finally:
            model.eval()
    assert not torch.allclose(a, c, atol=1e-3)


# --- padding: packed real tokens ---------------------------------------------------------------------------------
def test_packing_round_trip():
    from minisnip.model import Packing
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    p = Packing.from_mask(mask)
    x = torch.arange(8.0).view(2, 4, 1).expand(2, 4, 3)
    packed = p.pack(x)
    assert packed.shape == (5, 3) and packed[:, 0].tolist() == [0, 1, 2, 4, 5]
    back = p.unpack(packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and torch.count_nonzero(back[~mask.bool()]) == 0


def test_packed_forward_and_gradients_equal_the_unpacked_computation(tiny_model):
    """With padding, forward packs the real tokens; a trace makes it run unpacked. Same values, same gradients."""
    model = tiny_model(minisnip.BertModel, seed=3)
    ids = torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 9:] = 0
    grads, outs = [], []
    for trace in (None, []):
        model.zero_grad()
        out = model(ids, mask, trace=trace)
        (out * torch.linspace(-1, 1, 64)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


# --- the [CLS]-only last layer of the classifier ---------------------------------------------------------------
def test_cls_only_equals_first_position_of_full_forward(minilm, batch):
    model, _ = minilm
    with torch.no_grad():
        full = model(**batch)
        cls = model(**batch, cls_only=True)
        traced = model(**batch, trace=[], cls_only=True)  # a trace needs every position: cls_only is ignored
    assert cls.shape == (batch["input_ids"].shape[0], 1, 384)
    assert torch.allclose(cls, full[:, :1], atol=ATOL, rtol=0)
    assert torch.equal(traced, full)  # also 0 at the padded positions


@pytest.mark.parametrize("last", [dict(heads=[1, 3], ffn_dim=40), dict(heads=[], ffn_dim=128),
                                  dict(heads=[0, 1, 2, 3], ffn_dim=0), dict(heads=[2], ffn_dim=0)])
def test_cls_only_gradients_equal_full_on_pruned_last_layer(tiny_model, last):
    from minisnip.config import LayerShape
    layers = [LayerShape([0, 1, 2, 3], 128), LayerShape(**last)]
    model = tiny_model(minisnip.BertForSequenceClassification, num_labels=3, layers=layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    types = (torch.arange(9) >= 4).long().expand(3, 9)
    labels = torch.tensor([0, 2, 1])
    grads = []
    for cls_only in (False, True):
        model.zero_grad()
        hidden = model.bert(ids, mask, types, cls_only=cls_only)
        logits = model.classifier(model.bert.pooler(hidden))
        model.loss(logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    full, cls = grads
    assert full.keys() == cls.keys()
    for name in full:
        assert torch.allclose(full[name], cls[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("layout", ["packed", "unpacked", "no padding", "padded position 0"])
@pytest.mark.parametrize("last", [dict(heads=[1, 3], ffn_dim=40), dict(heads=[], ffn_dim=128),
                                  dict(heads=[0, 2], ffn_dim=0)])
def test_cls_trace_gives_the_full_traces_logits_norms_and_gradients(tiny_model, layout, last):
    """With cls_trace the classifier's traced last layer computes its FFN output and output at [CLS] alone: the
    logits, every branch's norm (the FFN block's recomputed by LayerTrace.ffn_output) and all gradients are those of
    the whole traced layer (float64, dropout off); the trace's other fields cover every token as before."""
    from minisnip.config import LayerShape
    from minisnip.snip.prior import identity_prior
    model = tiny_model(minisnip.BertForSequenceClassification, seed=4, num_labels=3,
                       layers=[LayerShape([0, 1, 2, 3], 128), LayerShape(**last)]).double()
    ids = torch.randint(0, 1000, (4, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[3, 3:] = 0, 0
    if layout == "no padding":
        mask = None
    elif layout == "padded position 0":
        mask[2, :2] = 0
    kinds = ("head", "attention", "neurons", "ffn")
    runs = []
    for cls_trace in (False, True):
        model.zero_grad()
        trace: list[LayerTrace] = []
        logits = model(ids, mask, trace=trace, pack_trace=layout != "unpacked", cls_trace=cls_trace)
        prior = identity_prior(model, trace, mask, kinds, neuron_group_size=8)
        (logits.pow(2).sum() + prior).backward()
        runs.append((logits.detach(), prior.detach(), trace,
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_logits, full_prior, full_trace, full_grads), (logits, prior, trace, grads) = runs
    assert full_trace[-1].cls_rows is None
    assert (trace[-1].cls_rows is None) == (layout == "padded position 0")  # that one is traced whole
    assert torch.allclose(logits, full_logits, atol=1e-12, rtol=0)
    assert torch.allclose(prior, full_prior, atol=1e-12, rtol=1e-12) and prior > 0
    assert full_grads.keys() == grads.keys() and len(grads) > 20
    for name in grads:
        assert torch.allclose(grads[name], full_grads[name], atol=1e-12, rtol=1e-10), name
    t, f = trace[-1], full_trace[-1]
    for field in ("x", "context", "attention_out", "h", "ffn_act"):
        a, b = getattr(t, field), getattr(f, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    if t.cls_rows is not None:
        rows = lambda v: v.detach().reshape(-1, v.shape[-1])[t.cls_rows]  # noqa: E731
        assert t.y.shape == (4, model.config.hidden_size) and torch.allclose(t.y, rows(f.y), atol=1e-12, rtol=0)
        if t.ffn_act is not None:
            assert t.ffn_out.shape == (4, model.config.hidden_size) and torch.allclose(t.ffn_out, rows(f.ffn_out), atol=1e-12, rtol=0)
            assert torch.allclose(t.ffn_output(model.bert.layers[-1]), f.ffn_out, atol=1e-12, rtol=0)


def test_packing_finds_each_sequences_cls_row():
    from minisnip.model import Packing
    p = Packing.from_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]))
    assert p.cls_rows.tolist() == [0, 3, 5] and p.index[p.cls_rows].tolist() == [0, 4, 8]
    assert Packing.from_mask(torch.tensor([[1, 1, 0], [0, 1, 1]])).cls_rows is None  # left padding: no [CLS] row


# --- bad input --------------------------------------------------------------------------------------------------
def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"hidden_size \(64\) is not divisible by num_attention_heads \(5\)"):
        minisnip.BertConfig(hidden_size=64, num_attention_heads=5, intermediate_size=128)


def test_config_rejects_bad_values(tiny_config):
    with pytest.raises(ConfigError, match="'num_hidden_layers' must be a positive integer, got 0"):
        tiny_config(num_hidden_layers=0)
    with pytest.raises(ConfigError, match="field 'hidden_act' must be one of .*, got 'swish'"):
        tiny_config(hidden_act="swish")
    with pytest.raises(ConfigError, match=r"field 'layers\[1\]\.heads' must be increasing head indices in \[0, 4\), "
                                          r"got \[0, 4\]"):
        tiny_config(layers=[{"heads": [0], "ffn_dim": 8}, {"heads": [0, 4], "ffn_dim": 8}])
    with pytest.raises(ConfigError, match=r"field 'layers\[0\]\.ffn_dim' must be in \[0, 128\], got 129"):
        tiny_config(layers=[{"heads": [0], "ffn_dim": 129}, {"heads": [0], "ffn_dim": 8}])
    with pytest.raises(ConfigError, match="'layers' lists 1 layer shapes but num_hidden_layers is 2"):
        tiny_config(layers=[{"heads": [0], "ffn_dim": 8}])


def test_config_json_round_trip(tiny_config):
    c = tiny_config(layers=[{"heads": [1, 3], "ffn_dim": 0}, {"heads": [], "ffn_dim": 17}])
    again = minisnip.BertConfig.from_dict(json.loads(c.to_json_string()))
    assert again == c and again.is_pruned and not tiny_config().is_pruned
    assert again.layers[0] == minisnip.LayerShape([1, 3], 0) and not again.layers[1].has_attention


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model(max_position_embeddings=16)


def test_token_id_outside_vocabulary(tiny):
    ids = torch.tensor([[1, 2, 1000, 3]])
    with pytest.raises(ValueError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        tiny(ids)
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        tiny(torch.tensor([[1, -1]]))


def test_sequence_longer_than_positions(tiny):
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings 16"):
        tiny(torch.ones(2, 17, dtype=torch.long))
    assert tiny(torch.ones(2, 16, dtype=torch.long)).shape == (2, 16, 64)  # the limit itself is fine


def test_empty_batch(tiny):
    with pytest.raises(ValueError, match=r"empty batch: input_ids has shape \(0, 5\)"):
        tiny(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty batch: input_ids has shape \(2, 0\)"):
        tiny(torch.zeros(2, 0, dtype=torch.long))


def test_attention_mask_wrong_shape(tiny):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids has shape \(2, 5\)"):
        tiny(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(5,\) but input_ids has shape \(2, 5\)"):
        tiny(ids, token_type_ids=torch.zeros(5, dtype=torch.long))


def test_other_bad_inputs(tiny):
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(5,\)"):
        tiny(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be integer token ids, got dtype torch.float32"):
        tiny(torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, 2\), got values in \[0, 2\]"):
        tiny(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.tensor([[0, 1, 2]]))


def test_float_token_types_and_mask_are_refused_with_their_dtype(tiny):
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_type_ids must be integer segment ids \(torch.long or torch.int32\), "
                                         r"got dtype torch.float32"):
        tiny(ids, token_type_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="token_type_ids must be integer segment ids .*, got dtype torch.bool"):
        tiny(ids, token_type_ids=torch.zeros(2, 3, dtype=torch.bool))
    for dtype in (torch.float32, torch.float16, torch.float64):
        with pytest.raises(ValueError, match=f"attention_mask must hold 1 .* integers or booleans, got dtype {dtype}"):
            tiny(ids, attention_mask=torch.ones(2, 3, dtype=dtype))


def test_attention_mask_values_other_than_0_and_1_are_refused(tiny):
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must hold only 1 \(real token\) and 0 \(padding\), "
                                         r"got values in \[0, 2\]"):
        tiny(ids, attention_mask=torch.tensor([[1, 2, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"got values in \[-10000, 0\]"):  # an additive mask, cast to integers
        tiny(ids, attention_mask=torch.tensor([[0, 0, -10000], [0, 0, 0]]))


def test_integer_and_boolean_inputs_of_every_allowed_dtype_agree(tiny):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask, types = torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[0, 0, 1], [0, 1, 0]])
    with torch.no_grad():
        ref = tiny(ids, mask, types)
        for m in (mask.bool(), mask.to(torch.uint8), mask.int()):
            assert torch.equal(tiny(ids, m, types.int()), ref)
        assert torch.equal(tiny(ids.int(), torch.ones_like(ids).bool()), tiny(ids))


def test_check_inputs_reads_the_device_once(tiny, monkeypatch):
    """All value checks share one read-back (one synchronisation on a GPU); see BertModel.check_inputs."""
    reads = []
    for name in ("tolist", "item", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _real=real, _n=name: reads.append(_n) or _real(self))
    ids = torch.ones(2, 3, dtype=torch.long)
    assert tiny.check_inputs(ids, torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.zeros_like(ids)) is True
    assert tiny.check_inputs(ids, None, None) is False
    assert reads == ["tolist", "tolist"]
