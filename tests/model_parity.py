"""The model-parity helpers shared by the families' tests: transformers' model of a
`DecoderConfig`, large random weights, right-padded batches, and per-token log-probs
and gradients on both sides (transformers' own shift on the PyTorch side)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from mmpo_jax.logprobs import model_token_logps, sequence_logps
from mmpo_jax.models.hf_weights import hf_weight_shapes, iter_hf_weights
from mmpo_jax.models.decoder import Decoder
from mmpo_jax.models.decoder_config import DecoderConfig

TOKEN_TOL = 1e-5
GRAD_TOL = 1e-4
MIN_GAP = 1e-3  # smallest top-1 / top-2 logit gap on the greedy paths (not a near-tie)


def hf_model(cfg: DecoderConfig):
    d = cfg.to_hf_dict()
    hc = transformers.AutoConfig.for_model(**d)
    model = transformers.AutoModelForCausalLM.from_config(
        hc, attn_implementation="eager", dtype=torch.float32
    )
    assert type(model).__name__ == d["architectures"][0]
    return model.eval()


def randomize_torch(model, seed: int = 0) -> None:
    """Large random weights: far-from-uniform logits, non-trivial norms and biases.

    Linear weights have 1.5x the variance-preserving scale. Larger still and the
    logits reach tens, where float32 rounding alone (transformers' own float32 against
    its float64) approaches the 1e-5 tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    offset = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma's norms scale by 1 + w
                p.copy_(offset + 0.4 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # tied: the token's own embedding both enters and scores, keep it smaller
                p.copy_((0.3 if tied else 1.0) * torch.randn(p.shape, generator=g))
            else:  # Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))


def torch_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load_ours_into_torch(model: Decoder, tmodel) -> None:
    state = {k: torch.from_numpy(v.copy()) for k, v in iter_hf_weights(model)}
    if tmodel.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = tmodel.load_state_dict(state, strict=True)
    assert not missing and not unexpected


def batch(vocab: int, lengths=(16, 11, 6), seed: int = 1):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(0, vocab, (len(lengths), t)) * mask  # right-padded with id 0
    return ids, mask


def torch_token_logps(tmodel, ids, mask):
    """transformers' own shift: logits at t score token t+1; aligned with ids (0 at t=0)."""
    out = tmodel(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    lp = torch.log_softmax(out[:, :-1].float(), dim=-1)
    lp = lp.gather(-1, torch.tensor(ids[:, 1:])[..., None])[..., 0]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def assert_far_from_uniform(tmodel, ids, mask):
    """The next-token distributions are peaked: mean entropy well below log V, and the
    typical top token has over 10x the uniform probability."""
    with torch.no_grad():
        logits = tmodel(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(logits, -1)
    real = torch.tensor(mask).bool()
    entropy = -(logp.exp() * logp).sum(-1)[real]
    v = logits.shape[-1]
    assert float(entropy.mean()) < np.log(v) - 0.75, float(entropy.mean())
    assert float(logp.exp().max(-1).values[real].median()) > 10.0 / v


def target_mask(mask):
    """Positions whose token is predicted: real tokens after the first."""
    m = np.array(mask, dtype=np.float32)
    m[:, 0] = 0
    return m


def torch_grads(tmodel, ids, mask) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    tmodel.zero_grad()
    lp = torch_token_logps(tmodel, ids, mask)
    seq = (lp * torch.tensor(target_mask(mask))).sum(-1)
    seq.sum().backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in tmodel.named_parameters()}
    return lp.detach().numpy(), grads


def our_logps_and_grads(model: Decoder, ids, mask, chunk=5):
    ids_j = jnp.asarray(ids, jnp.int32)
    tmask = jnp.asarray(target_mask(mask))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        lp = model_token_logps(m, ids_j, chunk=chunk)
        return jnp.sum(sequence_logps(lp, tmask, average=False)), lp

    (_, lp), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    # Grads have the params' structure: put them in a model to read them in HF layout.
    gmodel = nnx.merge(graphdef, grads, rest)
    return np.asarray(lp), dict(iter_hf_weights(gmodel))


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare_grads(ours: dict, theirs: dict, tied: bool) -> float:
    worst = 0.0
    for name, g in theirs.items():
        if name == "lm_head.weight" and tied:
            continue  # torch reports the shared tensor's grad under both names
        assert name in ours, name
        rel = max_rel(ours[name], g)
        assert rel < GRAD_TOL, (name, rel)
        worst = max(worst, rel)
    return worst


def check_torch_weights_into_ours(cfg: DecoderConfig, seed: int) -> tuple[float, float]:
    """transformers' model with large random weights (`seed`) -> build_model(get_tensor=its
    state dict, scanned layers): the log-probs within TOKEN_TOL and every gradient within
    GRAD_TOL of transformers'. Returns (max |dlogp|, max relative gradient difference)."""
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.options import ModelOptions

    tmodel = hf_model(cfg)
    randomize_torch(tmodel, seed=seed)
    model = build_model(cfg, ModelOptions(scan_layers=True), get_tensor=torch_state(tmodel).__getitem__)
    return _compare(model, tmodel, cfg, seed=1, chunk=5)


def check_our_weights_into_torch(cfg: DecoderConfig, scale: float, **options) -> tuple[float, float]:
    """Our random weights (`init_scale` `scale`, unscanned layers and `options`; norms and
    biases made non-trivial) -> iter_hf_weights -> transformers' load_state_dict(strict):
    the same checks as `check_torch_weights_into_ours`."""
    from mmpo_jax.models.build import build_model
    from mmpo_jax.models.options import ModelOptions

    model = build_model(cfg, ModelOptions(scan_layers=False, **options), seed=3, init_scale=scale)
    # norms and biases start at 1 (Gemma's at 0) and 0: make them non-trivial too
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("weight", "q_bias", "k_bias", "v_bias", "o_bias"):
            var.set_value(var.get_value() + 0.3 * rng.standard_normal(var.shape).astype(np.float32))
    tmodel = hf_model(cfg)
    load_ours_into_torch(model, tmodel)
    return _compare(model, tmodel, cfg, seed=2, chunk=16)


def _compare(model: Decoder, tmodel, cfg: DecoderConfig, seed: int, chunk: int) -> tuple[float, float]:
    ids, mask = batch(cfg.vocab_size, seed=seed)
    lp_t, g_t = torch_grads(tmodel, ids, mask)
    lp_o, g_o = our_logps_and_grads(model, ids, mask, chunk=chunk)
    tm = target_mask(mask).astype(bool)
    assert_far_from_uniform(tmodel, ids, mask)
    diff = float(np.max(np.abs(lp_o - lp_t)[tm]))
    assert diff < TOKEN_TOL, diff
    return diff, compare_grads(g_o, g_t, cfg.tie_word_embeddings)


def random_hf_weights(arch: DecoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers-layout weights: matrices at 1.5x the variance-preserving scale,
    norms near 1 (Gemma's `1 + w` near 1), a smaller tied embedding (as `randomize_torch`)."""
    rng = np.random.default_rng(seed)
    out = {}
    offset = 0.0 if arch.family.gemma_norms else 1.0
    for name, shape in hf_weight_shapes(arch).items():
        if name.endswith("norm.weight"):
            out[name] = offset + 0.3 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            # Gemma scales the embeddings by sqrt(hidden): without a smaller table the
            # token's own embedding swamps the residual and the tied head repeats it
            out[name] = (0.05 if arch.family.gemma_norms else 0.5) * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) * (1.5 / shape[1] ** 0.5)
    return {k: v.astype(np.float32) for k, v in out.items()}


@nnx.jit
def _logits(model, ids):
    hidden = model(ids)
    return jnp.einsum("btd,dv->btv", hidden, model.lm_head_kernel(), preferred_element_type=jnp.float32)


def reference_greedy(model, prompts, n_new, width=32):
    """Greedy decoding without a cache: the whole sequence through the ordinary forward
    at every step, right-padded to one width (causal attention keeps the padding out
    of the real positions), the argmax of each row's last real position appended.
    Returns (tokens [B, n_new], the smallest top-2 gap seen)."""
    seqs = [list(p) for p in prompts]
    gap = np.inf
    for _ in range(n_new):
        ids = np.zeros((len(seqs), width), np.int32)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
        logits = np.asarray(_logits(model, jnp.asarray(ids)))
        for b, s in enumerate(seqs):
            row = logits[b, len(s) - 1]
            top2 = np.sort(row)[-2:]
            gap = min(gap, float(top2[1] - top2[0]))
            s.append(int(np.argmax(row)))
    return np.asarray([s[len(p):] for s, p in zip(seqs, prompts)]), gap
