"""The reference forward pass against the published MiniCPM formulas, computed by hand.

A one-layer model small enough to follow on paper (hidden 4, two heads of size 2, two tokens),
evaluated with plain Python floats, scalar by scalar, straight from the formulas in
`shared/docs/minicpm-facts.md` §1: no torch, no code shared with the package.
"""

import math

import pytest
import torch

from minicpm_convert import reference
from minicpm_convert.spec import spec_from_config


class DictSource:
    def __init__(self, spec, weights):
        self.spec, self.weights = spec, weights

    def has(self, name):
        return name in self.weights

    def shape(self, name):
        return tuple(self.weights[name].shape)

    def read(self, name, start=0, stop=None):
        return self.weights[name][start:stop].float()


CONFIG = {"model_type": "minicpm", "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "intermediate_size": 2, "vocab_size": 3, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 16, "scale_emb": 12, "scale_depth": 1.4,
          "dim_model_base": 2}


def tiny_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.rand(*s, generator=g) - 0.5)  # noqa: E731
    w = {"model.embed_tokens.weight": r(3, 4) * 0.3, "model.norm.weight": 1 + r(4) * 0.2}
    p = "model.layers.0."
    for n in "qkvo":
        w[p + f"self_attn.{n}_proj.weight"] = r(4, 4)
    w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = r(2, 4), r(2, 4), r(4, 2)
    w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = 1 + r(4) * 0.2, 1 + r(4) * 0.2
    return w


def by_hand(w, tokens, cfg):
    """MiniCPM by its formulas, one scalar at a time."""
    L = lambda name: w[name].double().tolist()  # noqa: E731
    H, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    hd = H // nh
    r = cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"])
    matvec = lambda m, x: [sum(m[i][j] * x[j] for j in range(len(x))) for i in range(len(m))]  # noqa: E731

    def rmsnorm(x, g):
        s = math.sqrt(sum(v * v for v in x) / len(x) + eps)
        return [g[i] * x[i] / s for i in range(len(x))]

    def rope(v, pos):  # rotate_half layout within each head
        out = list(v)
        for h in range(nh):
            for i in range(hd // 2):
                theta = pos * cfg["rope_theta"] ** (-2 * i / hd)
                a, b = v[h * hd + i], v[h * hd + i + hd // 2]
                out[h * hd + i] = a * math.cos(theta) - b * math.sin(theta)
                out[h * hd + i + hd // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    emb = L("model.embed_tokens.weight")
    hs = [[v * cfg["scale_emb"] for v in emb[t]] for t in tokens]
    p = "model.layers.0."
    xs = [rmsnorm(h, L(p + "input_layernorm.weight")) for h in hs]
    qs = [rope(matvec(L(p + "self_attn.q_proj.weight"), x), i) for i, x in enumerate(xs)]
    ks = [rope(matvec(L(p + "self_attn.k_proj.weight"), x), i) for i, x in enumerate(xs)]
    vs = [matvec(L(p + "self_attn.v_proj.weight"), x) for x in xs]
    for t in range(len(tokens)):
        att = []
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            scores = [sum(a * b for a, b in zip(qs[t][sl], ks[s][sl])) / math.sqrt(hd) for s in range(t + 1)]
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            probs = [x / sum(e) for x in e]
            att += [sum(probs[s] * vs[s][h * hd + d] for s in range(t + 1)) for d in range(hd)]
        o = matvec(L(p + "self_attn.o_proj.weight"), att)
        hs[t] = [hs[t][i] + o[i] * r for i in range(H)]
    for t in range(len(tokens)):
        x = rmsnorm(hs[t], L(p + "post_attention_layernorm.weight"))
        gate, up = matvec(L(p + "mlp.gate_proj.weight"), x), matvec(L(p + "mlp.up_proj.weight"), x)
        act = [g / (1 + math.exp(-g)) * u for g, u in zip(gate, up)]
        d = matvec(L(p + "mlp.down_proj.weight"), act)
        hs[t] = [hs[t][i] + d[i] * r for i in range(H)]
    divisor = cfg["hidden_size"] / cfg["dim_model_base"]
    head = emb  # tied: the unscaled embedding
    return [[v for v in matvec(head, [x / divisor for x in rmsnorm(h, L("model.norm.weight"))])] for h in hs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_the_formulas_by_hand(seed):
    w = tiny_weights(seed)
    tokens = [2, 0, 1]
    spec = spec_from_config(CONFIG)
    got = reference.forward(DictSource(spec, w), tokens).double()
    want = torch.tensor(by_hand(w, tokens, CONFIG), dtype=torch.float64)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_llama_spec_has_unit_scales():
    spec = spec_from_config({**CONFIG, "model_type": "llama"})
    assert (spec.scale_emb, spec.residual_scale, spec.logit_scale) == (1.0, 1.0, 1.0)


def test_mup_scalars():
    spec = spec_from_config({**CONFIG, "hidden_size": 2304, "num_attention_heads": 36, "num_hidden_layers": 40,
                             "dim_model_base": 256})
    assert spec.logit_scale == 9.0
    assert spec.residual_scale == pytest.approx(1.4 / math.sqrt(40))


def test_capture_sees_every_weight_matrix_with_its_input():
    """The capture hook (importance matrices, GPTQ Hessians) is called once per weight matrix and
    block, in forward order, with the activations that multiply it: x @ W.T reproduces the pass."""
    w = tiny_weights(0)
    spec = spec_from_config(CONFIG)
    seen = []
    reference.forward(DictSource(spec, w), [2, 0, 1], capture=lambda name, x: seen.append((name, x.shape)))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    want = [f"model.layers.{i}.{n}.weight" for i in range(spec.num_hidden_layers) for n in per_layer]
    assert [n for n, _ in seen] == want
    for name, shape in seen:
        assert shape == (3, w[name].shape[1]), name
