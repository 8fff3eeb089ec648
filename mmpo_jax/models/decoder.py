"""A decoder-only transformer in Flax NNX for the Llama family (Llama 2/3, SmolLM2, Mistral,
Qwen2, Qwen3) and Gemma 2 / 3: `mmpo_jax.models.families` says what each adds.

`Decoder(cfg, options, rngs=...)`: `model(input_ids [B, T] int32) -> hidden [B, T, D]`
after the final RMSNorm; `model.lm_head_kernel() -> [D, V]`. Log-probs are computed
from these two (and `logit_soft_cap`) by `mmpo_jax.logprobs` (chunked, no [B, T, V] logits).
`model.decode(input_ids, positions, cache, slot, mask)`: the same layers with a KV
cache, for generation (`mmpo_jax.eval.generate`, which owns the cache layout and masks).

The rest of the model package: `decoder_config.DecoderConfig` (the architecture, with
transformers' names, from and to a `config.json`), `options.ModelOptions` (how the
model runs: dtypes, attention kernel, scan, remat, dropout, LoRA), `attention` (the
one attention entry point and its mask spec), `layers` (parameters with logical axes,
RMSNorm, applying RoPE), `rope` (its frequencies), `lora` (the adapters), `hf_weights`
(transformers' tensor names and layouts, `iter_hf_weights`), `build.build_model` (random init or a checkpoint, straight
onto the mesh), `checkpoints` / `gguf` (reading HF directories and GGUF files).

Layout. Our kernels are `[in, out]` (torch Linear weights are `[out, in]`), with the
heads split out: q `[embed, heads, head_dim]`, k/v `[embed, kv_heads, head_dim]`, o
`[heads, head_dim, embed]`, gate/up `[embed, mlp]`, down `[mlp, embed]`, the embedding
`[vocab, embed]`, the untied LM head `[embed, vocab]`. With `scan_layers` every layer
parameter has a leading `layers` axis (all layers stacked). Each parameter carries its
logical axis names in the `out_sharding` metadata (`nnx.get_partition_spec` under
`flax.core.spmd` rules, or `mmpo_jax.sharding.model_shardings`, turns them into mesh
axes).

LoRA (`ModelOptions.lora`): a targeted projection `W` (layout above) gets `<t>_lora_a`
`[*in, rank]` and `<t>_lora_b` `[rank, *out]` (`nnx.LoRAParam`, a subclass of
`nnx.Param`), and computes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`, as PEFT does;
B starts at zero. `iter_hf_weights` merges the adapters into the exported weights.

RoPE uses transformers' rotate-half convention: HF checkpoints load without any
permutation (GGUF's llama.cpp permutation is undone by the GGUF reader).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mmpo_jax.models.attention import MaskSpec, Segments, attention, cached_attention, window_mask
from mmpo_jax.models.layers import ACTIVATION_FNS, RMSNorm, apply_rope, apply_rope_rows, dropout, param
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.rope import inv_freq as rope_inv_freq
from mmpo_jax.models.lora import add_delta, add_lora_params, lora_delta
from mmpo_jax.models.options import ModelOptions
from mmpo_jax.sharding import logical_to_spec


@struct.dataclass
class Ropes:
    """The RoPE tables `(cos, sin)` of full-attention layers and of sliding ones (the same
    arrays unless the sliding layers have their own RoPE base, as Gemma 3's): `[T,
    head_dim]` shared by every row, or with `per_row` (static) `[B, T, head_dim]`, each
    row at its own positions (packed rows, generation)."""

    full: tuple[jax.Array, jax.Array]
    sliding: tuple[jax.Array, jax.Array]
    per_row: bool = struct.field(pytree_node=False, default=False)

    def apply(self, x: jax.Array, local: bool) -> jax.Array:
        """x `[B, T, N, H]` rotated by the tables of a sliding (`local`) or full layer."""
        cos, sin = self.sliding if local else self.full
        return (apply_rope_rows if self.per_row else apply_rope)(x, cos, sin)


# whether a layer is a sliding one: static, or traced (scanned layers of mixed kinds)
Sliding = bool | jax.Array


def _pick(sliding: Sliding, pair: tuple) -> Any:
    """`pair[sliding]`: indexed when static, selected elementwise when traced."""
    if isinstance(sliding, bool):
        return pair[sliding]
    return jax.tree.map(lambda full, local: jnp.where(sliding, local, full), pair[0], pair[1])


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd = options.param_dtype
        self.q_kernel = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, "normal", scale)
        self.k_kernel = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.v_kernel = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd, "normal", scale)
        self.o_kernel = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, "normal", scale)
        self.q_bias: nnx.Param | None
        self.k_bias: nnx.Param | None
        self.v_bias: nnx.Param | None
        if cfg.attention_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros", 0.0)
            self.k_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
            self.v_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros", 0.0)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = param(rngs, (d,), ("norm",), pd, "zeros", 0.0) if cfg.o_bias else None
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if cfg.qk_norm:
            offset = cfg.family.gemma_norms
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs, offset=offset)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pd, rngs=rngs, offset=offset)
        else:
            self.q_norm = self.k_norm = None
        add_lora_params(self, options.lora, rngs, pd, {
            "q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
            "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.scale = cfg.attention_scale
        # indexed by "this layer is a sliding one": (full attention, the window)
        cap = cfg.attn_logit_softcapping
        self.masks = (MaskSpec(causal=True, soft_cap=cap),
                      MaskSpec(causal=True, sliding_window=cfg.sliding_window, soft_cap=cap))
        self.compute_dtype = options.compute_dtype
        # the kernel chosen once for this architecture, backend and layout (`Decoder` applies
        # `ModelOptions.for_model`): static, nothing switches it at trace time
        assert options.kernel is not None, "ModelOptions.for_model(cfg) chooses the attention kernel"
        self.implementation = options.kernel
        # the Pallas kernels run in shard_map over the mesh, interpreted off their backend
        self.mesh = mesh
        self.interpret = options.interprets(self.implementation)

    def _project(self, x: jax.Array, lora_key: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, heads, head_dim]`, k, v `[B, T, kv_heads, head_dim]` of x `[B, T, D]`, before RoPE."""
        cd = self.compute_dtype

        def proj(t: str, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
            y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(cd))
            y = add_delta(y, lora_delta(self, t, x, self.lora, lora_key, cd))
            return y if bias is None else y + bias[...].astype(cd)

        q, k = proj("q", self.q_kernel, self.q_bias), proj("k", self.k_kernel, self.k_bias)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3, Gemma 3: over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, proj("v", self.v_kernel, self.v_bias)

    def _output(self, out: jax.Array, lora_key: jax.Array | None) -> jax.Array:
        """The output projection of the attention `[B, T, heads, head_dim]` -> `[B, T, D]`."""
        cd = self.compute_dtype
        y = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(cd))
        y = add_delta(y, lora_delta(self, "o", out, self.lora, lora_key, cd))
        return y if self.o_bias is None else y + self.o_bias[...].astype(cd)

    def __call__(self, x: jax.Array, ropes: Ropes, sliding: Sliding,
                 lora_key: jax.Array | None = None, segments: Segments | None = None) -> jax.Array:
        """x `[B, T, D]`; ropes: the RoPE tables of full and sliding layers; sliding:
        whether this layer is a sliding one, a Python bool or (scanned layers of mixed
        kinds) a traced bool that picks the branch at run time; segments: packed rows, a
        token attends only within its segment (branched: shared-prompt rows, see
        `mmpo_jax.models.attention.branched_segments`)."""
        q, k, v = self._project(x, lora_key)

        def run(local: bool) -> jax.Array:
            return attention(ropes.apply(q, local), ropes.apply(k, local), v, self.masks[local],
                             scale=self.scale, implementation=self.implementation, segments=segments,
                             mesh=self.mesh, interpret=self.interpret)

        if isinstance(sliding, bool):
            out = run(sliding)
        else:
            # both kernels keep a static window: one compiled branch per layer kind
            out = jax.lax.cond(sliding, lambda: run(True), lambda: run(False))
        return self._output(out, lora_key)

    def decode(self, x: jax.Array, ropes: Ropes, sliding: Sliding, cache_k: jax.Array,
               cache_v: jax.Array, slot: jax.Array, masks: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention with a KV cache (generation; no dropout).

        x `[B, T, D]` are the tokens of cache slots `slot .. slot+T-1` (`slot` an int32
        scalar, the same for every row: rows are left-padded); ropes: the RoPE tables
        (`per_row`) at each row's own positions, for full and for sliding layers;
        cache_k/cache_v `[B, kv_heads, S, head_dim]`; masks: `[B, T, S]` bool, True where
        a query may see a key slot, for full and for sliding layers. Returns
        `(y [B, T, D], cache_k, cache_v)` with this chunk's keys and values written.
        """
        q, k, v = self._project(x, None)
        (cos, sin), mask = _pick(sliding, (ropes.full, ropes.sliding)), _pick(sliding, masks)
        q = apply_rope_rows(q, cos, sin)
        k = apply_rope_rows(k, cos, sin)
        start = (0, 0, slot, 0)
        # [B, T, K, H] -> the cache's [B, K, T, H]: the slot axis next to head_dim, so
        # each head's keys are one contiguous [S, H] matrix for the score matmul
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
        out = cached_attention(q, cache_k, cache_v, mask, self.masks[False], scale=self.scale)
        return self._output(out, None), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs):
        d, m, pd = cfg.hidden_size, cfg.intermediate_size, options.param_dtype
        self.gate_kernel = param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.up_kernel = param(rngs, (d, m), ("embed", "mlp"), pd, "normal", scale)
        self.down_kernel = param(rngs, (m, d), ("mlp", "embed"), pd, "normal", scale)
        add_lora_params(self, options.lora, rngs, pd, {
            "gate": ((d,), ("embed",), (m,), ("mlp",)),
            "up": ((d,), ("embed",), (m,), ("mlp",)),
            "down": ((m,), ("mlp",), (d,), ("embed",)),
        })
        self.lora = options.lora
        self.compute_dtype = options.compute_dtype
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        cd = self.compute_dtype

        def proj(t: str, h: jax.Array) -> jax.Array:
            y = h @ getattr(self, f"{t}_kernel")[...].astype(cd)
            return add_delta(y, lora_delta(self, t, h, self.lora, lora_key, cd))

        return proj("down", ACTIVATION_FNS[self.act](proj("gate", x)) * proj("up", x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual blocks. Llama: `x + attn(input_layernorm(x))`, then
    `x + mlp(post_attention_layernorm(x))`. Gemma (`family.gemma_norms`) also norms
    each block's output: `x + post_attention_layernorm(attn(input_layernorm(x)))`, then
    `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`."""

    def __init__(self, cfg: DecoderConfig, options: ModelOptions, scale: float, *, rngs: nnx.Rngs,
                 mesh: jax.sharding.Mesh | None = None):
        sandwich = cfg.family.gemma_norms

        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, options.param_dtype, rngs=rngs, offset=sandwich)

        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, options, scale, rngs=rngs, mesh=mesh)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm: RMSNorm | None = norm() if sandwich else None
        self.post_feedforward_layernorm: RMSNorm | None = norm() if sandwich else None
        self.mlp = MLP(cfg, options, scale, rngs=rngs)
        self.dropout = options.dropout

    def _attention_out(self, a: jax.Array) -> jax.Array:
        return a if self.pre_feedforward_layernorm is None else self.post_attention_layernorm(a)

    def _mlp_block(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            return self.mlp(self.post_attention_layernorm(x), key)
        return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), key))

    def __call__(self, x: jax.Array, ropes: Ropes, sliding: Sliding,
                 dropout_key: jax.Array | None = None, segments: Segments | None = None) -> jax.Array:
        k1 = k2 = k3 = k4 = None
        if dropout_key is not None:
            k1, k2, k3, k4 = jax.random.split(dropout_key, 4)
        a = self._attention_out(self.self_attn(self.input_layernorm(x), ropes, sliding, k3, segments))
        if k1 is not None and self.dropout > 0:
            a = dropout(a, self.dropout, k1)
        x = x + a
        m = self._mlp_block(x, k4)
        if k2 is not None and self.dropout > 0:
            m = dropout(m, self.dropout, k2)
        return x + m

    def decode(self, x: jax.Array, ropes: Ropes, sliding: Sliding, cache_k: jax.Array, cache_v: jax.Array,
               slot: jax.Array, masks: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The layer on cache slots `slot..slot+T-1` (see `Attention.decode`); no dropout."""
        a, cache_k, cache_v = self.self_attn.decode(
            self.input_layernorm(x), ropes, sliding, cache_k, cache_v, slot, masks)
        x = x + self._attention_out(a)
        return x + self._mlp_block(x, None), cache_k, cache_v


def _remat_policy(name: str) -> Callable | None:
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def _layer_fn(remat: str, static_sliding: bool) -> Callable:
    """`(layer, x, ropes, sliding, key, segments) -> x`, rematerialised per `remat`;
    `static_sliding`: `sliding` is a Python bool (kept static through the remat)."""

    def run(layer: DecoderLayer, x: jax.Array, ropes: Ropes, sliding: Sliding, key: jax.Array | None,
            segments: Segments | None) -> jax.Array:
        return layer(x, ropes, sliding, key, segments)

    if remat == "none":
        return run
    return nnx.remat(run, policy=_remat_policy(remat), prevent_cse=False,
                     static_argnums=(3,) if static_sliding else ())


class Decoder(nnx.Module):
    """The decoder: token embedding, `num_hidden_layers` layers, final RMSNorm.

    `__call__(input_ids [B, T] int32) -> hidden [B, T, D]` (after the final norm, in
    the compute dtype). Sequences are right-padded: causal attention alone keeps real
    tokens from seeing the padding, and positions are 0..T-1 for every row.
    `lm_head_kernel() -> [D, V]` (the embedding transposed when tied).
    """

    def __init__(self, cfg: DecoderConfig, options: ModelOptions, *, rngs: nnx.Rngs,
                 init_scale: float = 0.02, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        # the attention kernel chosen here, once, for this architecture (a UserError where
        # the requested one cannot run it)
        options = options.for_model(cfg)
        self.options = options
        # With a mesh, activations between layers are constrained to the batch axes
        # (`batch` rule of mmpo_jax.sharding): FSDP gathers weights, not activations.
        self.mesh = mesh
        pd = options.param_dtype
        s = init_scale
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, "normal", s)
        # scanned: one DecoderLayer whose parameters have a leading `layers` axis
        self.layers: DecoderLayer | nnx.List[DecoderLayer]
        if options.scan_layers:
            n = cfg.num_hidden_layers

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, options, s, rngs=r, mesh=mesh)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(cfg, options, s, rngs=rngs, mesh=mesh) for _ in range(cfg.num_hidden_layers)]
            )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs, offset=cfg.family.gemma_norms)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, "normal", s)

    @property
    def logit_soft_cap(self) -> float | None:
        """Gemma 2's final-logit soft-cap `c`: logits become `c * tanh(logits / c)`."""
        return self.cfg.final_logit_softcapping

    def lm_head_kernel(self) -> jax.Array:
        """The LM head `[hidden, vocab]` in the compute dtype (the embedding transposed when tied)."""
        cd = self.options.compute_dtype
        if self.lm_head is None:
            return self.embed_tokens[...].astype(cd).T
        return self.lm_head[...].astype(cd)

    def rope(self, seq_len: int) -> Ropes:
        """The tables `[T, head_dim]` of positions 0..T-1, shared by every row."""
        return self.rope_at(jnp.arange(seq_len, dtype=jnp.int32), per_row=False)

    def rope_at(self, positions: jax.Array, per_row: bool = True) -> Ropes:
        """The tables `[*positions.shape, head_dim]` at int positions (`[B, T]` each row's
        own with `per_row`, else `[T]`), for full and sliding layers; angles in float32,
        cast to the compute dtype."""
        cfg, cd = self.cfg, self.options.compute_dtype

        def table(theta: float, scaling: dict | None) -> tuple[jax.Array, jax.Array]:
            # constants of the architecture, not state: nothing to train, save or shard
            inv, factor = rope_inv_freq(cfg.head_dim, theta, scaling, cfg.max_position_embeddings)
            freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
            emb = jnp.concatenate([freqs, freqs], axis=-1)
            f = jnp.float32(factor)
            return (jnp.cos(emb) * f).astype(cd), (jnp.sin(emb) * f).astype(cd)

        full = table(cfg.rope_theta, cfg.rope_scaling)
        local = full if cfg.rope_local_base_freq is None else table(cfg.rope_local_base_freq, None)
        return Ropes(full, local, per_row=per_row)

    def _scanned_kinds(self) -> jax.Array | None:
        """The layers' kinds `[layers]` bool (sliding or not) as a scanned input, or None
        when every layer is alike (its kind then stays static: `cfg.layer_sliding[0]`)."""
        kinds = self.cfg.layer_sliding
        return None if len(set(kinds)) == 1 else jnp.asarray(kinds, bool)

    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x

        spec = logical_to_spec(("batch", "seq", "act_embed"), x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings `[B, T, D]` of input_ids `[B, T]`, in the compute dtype."""
        table = self.embed_tokens[...]
        if self.mesh is not None:
            # FSDP: gather the table over `fsdp` first (as XLA does for matmul weights);
            # the lookup then splits over the vocab shards without resharding activations.

            spec = logical_to_spec(("vocab", None), table.shape, self.mesh)
            table = jax.lax.with_sharding_constraint(table, jax.sharding.NamedSharding(self.mesh, spec))
        x = jnp.take(table, input_ids, axis=0).astype(self.options.compute_dtype)
        if self.cfg.family.gemma_norms:
            # transformers rounds sqrt(hidden) to the activations' dtype first
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, x.dtype)
        return self._constrain(x)

    def __call__(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None,
                 positions: jax.Array | None = None, segments: Segments | None = None) -> jax.Array:
        """Final hidden states `[B, T, D]`; `dropout_key` turns dropout on (training).

        Packed rows (`mmpo_jax.data.layout`): positions `[B, T]` int32, each token's
        RoPE position (restarting at 0 per sequence), and the layout's `segments` (a
        token attends only to earlier tokens of its own segment; branched for
        shared-prompt rows, `mmpo_jax.models.attention.branched_segments`)."""
        cfg, options = self.cfg, self.options
        x = self._embed(input_ids)
        ropes = self.rope(input_ids.shape[1]) if positions is None else self.rope_at(positions)
        n = cfg.num_hidden_layers
        use_dropout = dropout_key is not None and options.uses_dropout
        keys = jax.random.split(dropout_key, n) if dropout_key is not None and use_dropout else None
        kinds = self._scanned_kinds()
        if options.scan_layers:
            # mixed layer kinds (Gemma): each layer's kind is a scanned input, and the
            # attention picks its branch with lax.cond (see Attention.__call__)
            layer_fn = _layer_fn(options.remat, static_sliding=kinds is None)

            @nnx.scan(in_axes=(nnx.Carry, 0, None, 0 if kinds is not None else None, 0 if use_dropout else None,
                               None),
                      out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h: jax.Array, layer: DecoderLayer, ropes: Ropes, sliding: Sliding | None, key: jax.Array | None,
                     segments: Segments | None) -> jax.Array:
                return self._constrain(layer_fn(layer, h, ropes, cfg.layer_sliding[0] if kinds is None else sliding,
                                                key, segments))

            assert isinstance(self.layers, DecoderLayer)  # one module, its arrays stacked over layers
            x = body(x, self.layers, ropes, kinds, keys, segments)
        else:
            assert isinstance(self.layers, nnx.List)
            layer_fn = _layer_fn(options.remat, static_sliding=True)
            for i, layer in enumerate(self.layers):
                x = self._constrain(layer_fn(layer, x, ropes, cfg.layer_sliding[i],
                                             keys[i] if keys is not None else None, segments))
        return self._constrain(self.norm(x))

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache: tuple[jax.Array, jax.Array],
               slot: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The forward with a KV cache, for generation (no dropout).

        input_ids `[B, T]` int32 go to cache slots `slot..slot+T-1` (`slot` an int32
        scalar shared by all rows); positions `[B, T]` their RoPE positions (each row's
        own: a left-padded row starts at position 0 after its padding); cache `(k, v)`,
        each `[layers, B, kv_heads, S, head_dim]`; mask `[B, T, S]` bool, True where a
        query may see a key slot (causality and padding: each layer adds its own
        sliding window, slot distances being position distances). Returns
        `(hidden [B, T, D] after the final norm, cache)` with this chunk's keys and
        values written into the cache.
        """
        cfg = self.cfg
        x = self._embed(input_ids)
        ropes = self.rope_at(positions)
        masks = (mask, mask)
        if cfg.sliding_window is not None:
            slots = slot + jnp.arange(input_ids.shape[1])
            masks = (mask, mask & window_mask(slots, mask.shape[-1], cfg.sliding_window)[None])
        cache_k, cache_v = cache
        kinds = self._scanned_kinds()
        if self.options.scan_layers:

            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, 0 if kinds is not None else None), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(h: jax.Array, layer: DecoderLayer, ck: jax.Array, cv: jax.Array, sliding: Sliding | None
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                h, ck, cv = layer.decode(h, ropes, cfg.layer_sliding[0] if sliding is None else sliding, ck, cv,
                                         slot, masks)
                return self._constrain(h), (ck, cv)

            assert isinstance(self.layers, DecoderLayer)  # as in `__call__`
            x, (cache_k, cache_v) = body(x, self.layers, cache_k, cache_v, kinds)
        else:
            ks, vs = [], []
            assert isinstance(self.layers, nnx.List)
            for i, layer in enumerate(self.layers):
                x, ck, cv = layer.decode(x, ropes, cfg.layer_sliding[i], cache_k[i], cache_v[i], slot, masks)
                x = self._constrain(x)
                ks.append(ck)
                vs.append(cv)
            cache_k, cache_v = jnp.stack(ks), jnp.stack(vs)
        return self._constrain(self.norm(x)), (cache_k, cache_v)
